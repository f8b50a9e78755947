"""pynetdicom event handlers: thin adapters from DIMSE events to :class:`Intake`."""

from __future__ import annotations

import logging
from typing import Any

from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from service.scp.intake import Intake, Received, StoreStatus

log = logging.getLogger(__name__)

VERIFICATION_SUCCESS = 0x0000


def handle_echo(event: evt.Event) -> int:
    log.info("C-ECHO calling_ae=%s", event.assoc.requestor.ae_title)
    return VERIFICATION_SUCCESS


def make_store_handler(intake: Intake) -> Any:
    def handle_store(event: evt.Event) -> int:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            try:
                ds = event.dataset
                ds.file_meta = event.file_meta
                encoded = event.encoded_dataset(include_meta=True)
            except Exception:
                log.warning("store refused: undecodable dataset calling_ae=%s", calling_ae)
                return StoreStatus.CANNOT_UNDERSTAND
            request = event.request
            assert isinstance(request, C_STORE)
            rx = Received(
                encoded=encoded,
                dataset=ds,
                command_sop_class_uid=str(request.AffectedSOPClassUID),
                command_sop_instance_uid=str(request.AffectedSOPInstanceUID),
                transfer_syntax_uid=str(UID(event.context.transfer_syntax)),
                calling_ae_title=calling_ae,
            )
            return intake.store(rx)
        except Exception:
            # A bug here must cost one instance a retry, never the listener.
            log.exception("store handler failed calling_ae=%s", calling_ae)
            return StoreStatus.OUT_OF_RESOURCES

    return handle_store
