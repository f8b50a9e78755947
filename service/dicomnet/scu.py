"""The gateway's one DICOM client (SCU): associations to a peer, C-ECHO and C-STORE.

The worker sends its results with :func:`c_store_many` (a study's outputs to one peer over one
association) or :func:`c_store`; the dashboard echoes peers with :func:`echo` and sends
uploads to our own listener with :func:`store`. All three open the association the same way
(:func:`associate`): the calling AE title, one timeout for ACSE, DIMSE and the network, TLS when the peer
has it.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, Unpack

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.core.errors import PermanentError, TransientError
from service.core.settings import Settings
from service.core.status import ReasonCode

SUCCESS = 0x0000
# PS3.4 Annex C: "Refused: SOP Class not supported", for a data set whose class the peer did not accept.
SOP_CLASS_NOT_SUPPORTED = 0x0122
# Status categories from PS3.4 Annex B: 0xA7xx/0xB000-ish warnings are fine, 0xA7xx/0xC/0xA9 failures.
_SUCCESS_OR_WARNING = {SUCCESS, 0xB000, 0xB006, 0xB007}

# (abstract syntax, transfer syntaxes; None: pynetdicom's default uncompressed ones)
Context = tuple[str, list[str] | None]


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    tls: bool = False


def listener_peer(settings: Settings) -> Peer:
    """Our own listener as a client on this host reaches it (loopback when it binds every address)."""
    host = settings.listener_host
    # Recognises a wildcard bind, binds nothing (bandit B104).
    if host in {"", "0.0.0.0", "::"}:  # nosec B104
        host = "127.0.0.1"
    if settings.listener_plaintext or settings.listener_tls_port is None:
        return Peer(settings.listener_ae_title, host, settings.listener_port)
    return Peer(settings.listener_ae_title, host, settings.listener_tls_port, tls=True)


class NoAssociation(Exception):
    """No association: ``rejected`` when the peer answered A-ASSOCIATE-RJ, else it was not reached;
    ``error`` names the exception when connecting raised one (TLS set-up, socket)."""

    def __init__(self, detail: str, *, rejected: bool, error: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.rejected = rejected
        self.error = error


@contextmanager
def associate(
    peer: Peer,
    *,
    calling_ae_title: str,
    contexts: Iterable[Context],
    timeout: float,
    tls: Callable[[], ssl.SSLContext] | None = None,
) -> Iterator[Any]:
    """An established association to ``peer``, released on leaving; raises :class:`NoAssociation`.

    ``tls`` makes the client context for a peer with ``tls`` set (BCP 195: the context enforces
    TLS >= 1.2); it is called in here so that a context that cannot be made reads as "not reached".
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    for abstract_syntax, syntaxes in contexts:
        if syntaxes:
            ae.add_requested_context(abstract_syntax, syntaxes)
        else:
            ae.add_requested_context(abstract_syntax)
    try:
        tls_args = (tls(), peer.host) if peer.tls and tls is not None else None
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except Exception as exc:  # TLS set-up and socket errors: the peer is unreachable from here
        error = type(exc).__name__
        raise NoAssociation(f"could not connect: {error}", rejected=False, error=error) from exc
    if not assoc.is_established:
        rejected = bool(assoc.is_rejected)
        raise NoAssociation("association rejected" if rejected else "association failed", rejected=rejected)
    try:
        yield assoc
    finally:
        assoc.release()


def _status(response: Any) -> int | None:
    return int(response.Status) if response and "Status" in response else None


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str
    elapsed_ms: int


def echo(
    peer: Peer,
    *,
    calling_ae_title: str,
    tls: Callable[[], ssl.SSLContext] | None = None,
    timeout: float = 5.0,
) -> EchoResult:
    """One C-ECHO; the detail says what went wrong in words an admin can act on."""
    started = time.monotonic()
    try:
        with associate(
            peer, calling_ae_title=calling_ae_title, contexts=[(Verification, None)], timeout=timeout, tls=tls
        ) as assoc:
            code = _status(assoc.send_c_echo())
    except NoAssociation as exc:
        if exc.rejected:
            detail = "association rejected (AE title or address not accepted)"
        elif exc.error is not None:
            detail = f"could not connect: {exc.error}"
        else:
            detail = "no association (peer unreachable or not DICOM)"
        return EchoResult(False, detail, _ms(started))
    if code == SUCCESS:
        return EchoResult(True, "C-ECHO succeeded", _ms(started))
    failed = "no response" if code is None else f"0x{code:04X}"
    return EchoResult(False, f"C-ECHO failed: {failed}", _ms(started))


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def store(
    ds: Dataset,
    peer: Peer,
    *,
    calling_ae_title: str,
    timeout: float,
    tls: Callable[[], ssl.SSLContext] | None = None,
    fallback: tuple[str, ...] = (ExplicitVRLittleEndian,),
) -> int | None:
    """C-STORE one data set, offered in its own transfer syntax and the ``fallback`` ones; returns the
    peer's status (None: no response).

    Raises :class:`NoAssociation`, as rejected when the peer accepted none of the offered syntaxes.
    """
    (status,) = store_many(
        [ds], peer, calling_ae_title=calling_ae_title, timeout=timeout, tls=tls, fallback=fallback
    )
    return status


def store_many(
    datasets: Sequence[Dataset],
    peer: Peer,
    *,
    calling_ae_title: str,
    timeout: float,
    tls: Callable[[], ssl.SSLContext] | None = None,
    fallback: tuple[str, ...] = (ExplicitVRLittleEndian,),
) -> list[int | None]:
    """C-STORE each data set, in order, over one association (one set-up instead of one each); each one's
    status (None: no response; SOP_CLASS_NOT_SUPPORTED: the peer took none of its contexts).

    Raises :class:`NoAssociation`, as rejected when the peer accepted none of the offered contexts.
    """
    offered: dict[str, list[str]] = {}
    for ds in datasets:
        syntaxes = offered.setdefault(str(ds.SOPClassUID), [])
        syntaxes.extend(s for s in (str(ds.file_meta.TransferSyntaxUID), *fallback) if s not in syntaxes)
    with associate(
        peer, calling_ae_title=calling_ae_title, contexts=offered.items(), timeout=timeout, tls=tls
    ) as assoc:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        if not accepted & offered.keys():
            raise NoAssociation("no accepted presentation context", rejected=True)
        statuses: list[int | None] = []
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:
                statuses.append(SOP_CLASS_NOT_SUPPORTED)
            elif not assoc.is_established:  # the peer aborted after an earlier one: no response
                statuses.append(None)
            else:
                statuses.append(_status(assoc.send_c_store(ds)))
        return statuses


class StoreTarget(TypedDict):
    """Where :func:`c_store` and :func:`c_store_many` send, as whom; ``timeout`` for ACSE, DIMSE and the
    network (default 30 s); with ``tls_context`` the association runs over TLS."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    timeout: NotRequired[float]
    tls_context: NotRequired[ssl.SSLContext | None]


def c_store(path: Path, **target: Unpack[StoreTarget]) -> None:
    """Send one file; raises TransientError when the peer is unreachable, PermanentError when it refuses.

    Offers the file's own syntax and both uncompressed ones, so a picky PACS still finds one it accepts.
    """
    (error,) = c_store_many([path], **target)
    if error is not None:
        raise error


def c_store_many(
    paths: Sequence[Path], **target: Unpack[StoreTarget]
) -> list[TransientError | PermanentError | None]:
    """Send files over one association, as :func:`c_store` sends one; each file's outcome: None when
    stored, else the error it met (an association that could not be made fails every file alike)."""
    tls_context = target.get("tls_context")
    try:
        codes = store_many(
            [dcmread(path) for path in paths],
            Peer(target["ae_title"], target["host"], target["port"], tls=tls_context is not None),
            calling_ae_title=target["calling_ae_title"],
            timeout=target.get("timeout", 30.0),
            tls=(lambda: tls_context) if tls_context is not None else None,
            fallback=(ExplicitVRLittleEndian, ImplicitVRLittleEndian),
        )
    except NoAssociation as exc:
        if exc.rejected:
            return [PermanentError(ReasonCode.DELIVERY_REFUSED, exc.detail)] * len(paths)
        return [TransientError(ReasonCode.DELIVERY_UNREACHABLE, exc.detail)] * len(paths)
    return [_judged(code) for code in codes]


def _judged(code: int | None) -> TransientError | PermanentError | None:
    if code is None:
        return TransientError(ReasonCode.DELIVERY_UNREACHABLE, "no C-STORE response")
    if code in _SUCCESS_OR_WARNING:
        return None
    if code & 0xFF00 == 0xA700:
        return TransientError(ReasonCode.DELIVERY_UNREACHABLE, f"peer out of resources 0x{code:04X}")
    return PermanentError(ReasonCode.DELIVERY_REFUSED, f"C-STORE status 0x{code:04X}")
