"""The DICOM listener process: a pynetdicom AE plus the study assembler."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import make_session_factory, migrate
from service.core.queue import make_celery
from service.core.settings import Settings
from service.scp.assembler import StudyAssembler
from service.scp.handlers import handle_echo, make_store_handler
from service.scp.intake import Intake

log = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")

STORAGE_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.listener_ae_title)
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = 60
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.require_called_aet = True
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


class Listener:
    """Owns the AE server and the assembler thread; ``start``/``stop`` for tests and the CLI alike."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions or make_session_factory(settings)
        self.celery = make_celery(settings)
        self.intake = Intake(settings, self.sessions)
        self.assembler = StudyAssembler(settings, self.sessions, self.celery)
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        ae = build_ae(self.settings)
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, make_store_handler(self.intake)),
        ]
        self._server = ae.start_server(
            (self.settings.listener_host, self.settings.listener_port), block=False, evt_handlers=handlers
        )
        self.assembler.start()
        log.info(
            "listener up ae_title=%s port=%d quiet=%.1fs",
            self.settings.listener_ae_title,
            self.settings.listener_port,
            self.settings.study_quiet_seconds,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.assembler.stop()


def run_listener(settings: Settings, *, run_migrations: bool = True) -> None:
    if run_migrations:
        migrate(settings)
    listener = Listener(settings)
    listener.start()
    stopped = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stopped.wait()
    log.info("listener stopping")
    listener.stop()
