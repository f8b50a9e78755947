"""One sender per destination type behind one interface: ``sender_for(settings, target)(path)`` sends a
result file once, raising TransientError (retry) or PermanentError (dead letter); ``batch_sender_for``
sends several files to one destination together (one association for DICOM) with each file's outcome.
worker.delivery owns everything else about an attempt (claim, outcome, back-off), the same for every
type."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from service.core.errors import PermanentError, TransientError
from service.core.settings import Settings
from service.core.status import ReasonCode
from service.core.tls import client_context
from service.dicomnet.scu import c_store, c_store_many
from service.dicomweb.config import DicomwebDestination
from service.dicomweb.stow_client import stow_file

Sender = Callable[[Path], None]
# Each file's outcome: None when sent, else the error it met.
BatchSender = Callable[[list[Path]], list[TransientError | PermanentError | None]]
# A delivery row's destination as it was made: (AE title or DICOMweb name, host or URL, port).
Target = tuple[str, str, int]


def sender_for(settings: Settings, target: Target) -> Sender:
    """How to send to ``target``, from the destination's current settings."""
    dest = next((d for d in settings.destinations if (d.ae_title, d.host, d.port) == target), None)
    if isinstance(dest, DicomwebDestination):
        return partial(stow_file, dest)
    if target[1].startswith(("http://", "https://")):
        return partial(_gone, target[0])
    # Deliveries keep the address they were made for; TLS follows the destination's current setting.
    tls = client_context(settings) if dest is not None and dest.tls else None
    return partial(
        c_store,
        ae_title=target[0],
        host=target[1],
        port=target[2],
        calling_ae_title=settings.sender_ae_title,
        tls_context=tls,
        timeout=settings.delivery_timeout_seconds,
    )


def batch_sender_for(settings: Settings, target: Target) -> BatchSender:
    """How to send several files to ``target`` together: C-STORE over one association, else one by one."""
    send = sender_for(settings, target)
    if isinstance(send, partial) and send.func is c_store:
        return partial(c_store_many, **send.keywords)
    return partial(_one_by_one, send)


def _one_by_one(send: Sender, paths: list[Path]) -> list[TransientError | PermanentError | None]:
    outcomes: list[TransientError | PermanentError | None] = []
    for path in paths:
        try:
            send(path)
        except (TransientError, PermanentError) as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)
    return outcomes


def _gone(name: str, path: Path) -> None:
    # A DICOMweb destination's credentials live only in the settings: without it there is no way to send.
    raise PermanentError(ReasonCode.DELIVERY_REFUSED, f"DICOMweb destination {name} no longer configured")
