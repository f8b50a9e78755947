"""pynetdicom event handlers: thin adapters from DIMSE/ACSE events to the peer policy and :class:`Intake`.

Every handler catches everything: pynetdicom swallows exceptions from notification handlers (so a failing
peer check would let the association through) and turns store-handler exceptions into 0xC211. Ours fail
closed (reject) or answer 0xA700 so the PACS retries.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from service.core.status import ReasonCode
from service.scp.intake import Intake, Received, StoreStatus
from service.scp.peers import PeerPolicy
from service.scp.pynetdicom_compat import discard_received_files
from service.scp.safelog import log_failure

log = logging.getLogger(__name__)

VERIFICATION_SUCCESS = 0x0000
# PS3.7 C.5.7 "Refused: Not Authorized": a peer that got past association checks it should not have.
NOT_AUTHORIZED = 0x0124

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised.
_REJECT_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03


def _calling_ae(assoc: Any) -> str:
    return str(assoc.requestor.ae_title).strip()


class AssociationStudies:
    """Studies each open association has stored instances into (for the assembler's quiet period).

    A study counts as busy while an association that sent it is open, but only for ``hold_seconds`` after
    its last instance there: a router that keeps one association open for hours must not hold every study
    it ever sent.
    """

    def __init__(self, hold_seconds: float = 300.0) -> None:
        self._hold = hold_seconds
        self._lock = threading.Lock()
        self._by_assoc: dict[int, dict[int, float]] = {}

    def add(self, assoc: object, study_id: int) -> None:
        with self._lock:
            self._by_assoc.setdefault(id(assoc), {})[study_id] = time.monotonic()

    def pop(self, assoc: object) -> set[int]:
        with self._lock:
            return set(self._by_assoc.pop(id(assoc), {}))

    def busy(self) -> set[int]:
        cutoff = time.monotonic() - self._hold
        with self._lock:
            return {study for seen in self._by_assoc.values() for study, at in seen.items() if at >= cutoff}


def handle_echo(event: evt.Event) -> int:
    log.info("C-ECHO calling_ae=%s", _calling_ae(event.assoc))
    return VERIFICATION_SUCCESS


def make_requested_handler(policy: PeerPolicy) -> Callable[[evt.Event], None]:
    """EVT_REQUESTED: reject peers whose (calling AE title, address) pair is not allowed."""

    def handle_requested(event: evt.Event) -> None:
        assoc = event.assoc
        calling, address = "?", "?"
        try:
            calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "")).strip()
            address = str(assoc.requestor.address)
            if policy.allows(calling, address):
                return
        except Exception as exc:
            log_failure(log, "peer check failed; rejecting", exc)
        log.warning(
            "association rejected reason=%s calling_ae=%s address=%s",
            ReasonCode.PEER_NOT_ALLOWED,
            calling,
            address,
        )
        try:
            assoc.acse.send_reject(_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
        finally:
            # As pynetdicom does for its own rejections: wait for the RJ to go out, then end the thread.
            assoc.kill()

    return handle_requested


def _received_file(event: evt.Event, staging: Path) -> tuple[Path, bool]:
    """The received dataset as a Part 10 file, and whether we made it (and must delete it)."""
    try:
        # STORE_RECV_CHUNKED_DATASET: pynetdicom streamed the P-DATA into this file already.
        streamed = event.dataset_path
    except AttributeError:
        streamed = None
    if streamed is not None:
        return Path(streamed), False
    # Chunked receive switched off (e.g. by other code in the process): write what is in memory.
    staging.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=staging, suffix=".dcm")
    with os.fdopen(fd, "wb") as fh:
        fh.write(event.encoded_dataset(include_meta=True))
    return Path(name), True


def make_store_handler(
    intake: Intake, policy: PeerPolicy, studies: AssociationStudies, staging: Path
) -> Callable[[evt.Event], int]:
    def handle_store(event: evt.Event) -> int:
        assoc = event.assoc
        calling_ae = "?"
        made: Path | None = None
        try:
            calling_ae = _calling_ae(assoc)
            # Defence in depth: the association-level check already ran.
            if not policy.allows(calling_ae, str(assoc.requestor.address)):
                log.warning("store refused reason=%s calling_ae=%s", ReasonCode.PEER_NOT_ALLOWED, calling_ae)
                return NOT_AUTHORIZED
            request = event.request
            if not isinstance(request, C_STORE):
                # pynetdicom hands EVT_C_STORE only C-STOREs; anything else is a bug on our side of the
                # wire, and like every bug in here it costs the instance a retry (0xA700).
                log.error("store handler got %s calling_ae=%s", type(request).__name__, calling_ae)
                return int(StoreStatus.OUT_OF_RESOURCES)
            path, ours = _received_file(event, staging)
            made = path if ours else None
            rx = Received(
                path=path,
                command_sop_class_uid=str(request.AffectedSOPClassUID or ""),
                command_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                transfer_syntax_uid=str(UID(event.context.transfer_syntax)),
                calling_ae_title=calling_ae,
            )
            outcome = intake.store(rx)
            if outcome.study_id is not None:
                studies.add(assoc, outcome.study_id)
            return int(outcome.status)
        except Exception as exc:
            # A bug here must cost one instance a retry, never the listener.
            log_failure(log, "store handler failed calling_ae=%s", exc, calling_ae)
            return int(StoreStatus.OUT_OF_RESOURCES)
        finally:
            if made is not None:
                made.unlink(missing_ok=True)

    return handle_store


def make_association_end_handler(
    studies: AssociationStudies, touch: Callable[[Collection[int]], None]
) -> Callable[[evt.Event], None]:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: restart the quiet period of the studies it sent."""

    def handle_end(event: evt.Event) -> None:
        try:
            # A data set received but never handled (the association ended mid-transfer, or released
            # or aborted with messages still queued) must not outlive it in the staging folder.
            discard_received_files(event.assoc)
            study_ids = studies.pop(event.assoc)
            if study_ids:
                touch(study_ids)
        except Exception as exc:
            log_failure(log, "association end handler failed", exc)

    return handle_end
