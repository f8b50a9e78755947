"""C-STORE of result objects to a destination, with transfer-syntax fallback."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from service.core.status import ReasonCode
from worker.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

# Status categories from PS3.4 Annex B: 0xA7xx/0xB000-ish warnings are fine, 0xA7xx/0xC/0xA9 failures.
_SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}


def c_store(
    path: Path,
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    timeout: float = 30,
    tls_context: ssl.SSLContext | None = None,
) -> None:
    """Send one file; raises TransientError when the peer is unreachable, PermanentError when it refuses.

    With ``tls_context`` the association runs over TLS (BCP 195; the context enforces TLS >= 1.2).
    """
    ds = dcmread(path)
    sop_class = ds.SOPClassUID
    native = ds.file_meta.TransferSyntaxUID
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    # Offer the file's own syntax and both uncompressed ones, so a picky PACS still finds one it accepts.
    syntaxes = list(dict.fromkeys([native, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ae.add_requested_context(sop_class, syntaxes)
    tls_args = (tls_context, host) if tls_context is not None else None
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise PermanentError(ReasonCode.DELIVERY_REFUSED, "association rejected")
        raise TransientError(ReasonCode.DELIVERY_UNREACHABLE, "association failed")
    try:
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            raise PermanentError(ReasonCode.DELIVERY_REFUSED, "no accepted presentation context")
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise TransientError(ReasonCode.DELIVERY_UNREACHABLE, "no C-STORE response")
    code = int(status.Status)
    if code in _SUCCESS_OR_WARNING:
        return
    if code & 0xFF00 == 0xA700:
        raise TransientError(ReasonCode.DELIVERY_UNREACHABLE, f"peer out of resources 0x{code:04X}")
    raise PermanentError(ReasonCode.DELIVERY_REFUSED, f"C-STORE status 0x{code:04X}")
