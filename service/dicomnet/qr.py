"""Query/Retrieve as a client (Study Root): C-FIND a study by Study Instance UID or accession number, then
C-MOVE it to an AE (our listener), on associations opened like every other (``scu.associate``)."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from service.core.errors import PermanentError, TransientError
from service.core.status import ReasonCode
from service.dicomnet.scu import NoAssociation, Peer, associate

PENDING = {0xFF00, 0xFF01}
SUCCESS = 0x0000
WARNING = 0xB000  # C-MOVE: one or more sub-operations failed or warned


@dataclass(frozen=True)
class MoveResult:
    status: int
    completed: int
    failed: int
    warning: int


def _status(response: Dataset | None) -> int | None:
    return int(response.Status) if response is not None and "Status" in response else None


@contextmanager
def _association(
    peer: Peer, model: str, calling_ae_title: str, timeout: float, tls: Callable[[], ssl.SSLContext] | None
) -> Iterator[Any]:
    """An association for one Q/R model; no association is a TransientError (not reached) or a
    PermanentError (rejected: our AE title is not known there)."""
    try:
        with associate(
            peer, calling_ae_title=calling_ae_title, contexts=[(model, None)], timeout=timeout, tls=tls
        ) as assoc:
            yield assoc
    except NoAssociation as exc:
        if exc.rejected:
            raise PermanentError(ReasonCode.DELIVERY_REFUSED, f"Q/R peer: {exc.detail}") from exc
        raise TransientError(ReasonCode.DELIVERY_UNREACHABLE, f"Q/R peer: {exc.detail}") from exc


def find_studies(
    peer: Peer,
    *,
    calling_ae_title: str,
    study_uid: str | None = None,
    accession: str | None = None,
    timeout: float = 30.0,
    tls: Callable[[], ssl.SSLContext] | None = None,
) -> list[str]:
    """The Study Instance UIDs that match (STUDY level, one key); raises PermanentError when the peer
    refuses the query, TransientError when it cannot be reached."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid or ""
    query.AccessionNumber = accession or ""
    found: list[str] = []
    model = StudyRootQueryRetrieveInformationModelFind
    with _association(peer, model, calling_ae_title, timeout, tls) as assoc:
        for status, identifier in assoc.send_c_find(query, model):
            code = _status(status)
            if code in PENDING and identifier is not None and identifier.get("StudyInstanceUID"):
                found.append(str(identifier.StudyInstanceUID))
            elif code is None:
                raise TransientError(ReasonCode.DELIVERY_UNREACHABLE, "C-FIND: no response")
            elif code != SUCCESS and code not in PENDING:
                raise PermanentError(ReasonCode.DELIVERY_REFUSED, f"C-FIND status 0x{code:04X}")
    return list(dict.fromkeys(found))


def move_study(
    peer: Peer,
    study_uid: str,
    *,
    calling_ae_title: str,
    move_ae_title: str,
    timeout: float = 600.0,
    tls: Callable[[], ssl.SSLContext] | None = None,
) -> MoveResult:
    """C-MOVE one study to ``move_ae_title``; the final response's status and sub-operation counts."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    final: Dataset | None = None
    model = StudyRootQueryRetrieveInformationModelMove
    with _association(peer, model, calling_ae_title, timeout, tls) as assoc:
        for status, _identifier in assoc.send_c_move(query, move_ae_title, model):
            if _status(status) not in PENDING:
                final = status
    code = _status(final)
    if code is None:
        raise TransientError(ReasonCode.DELIVERY_UNREACHABLE, "C-MOVE: no final response")
    assert final is not None
    return MoveResult(
        status=code,
        completed=int(final.get("NumberOfCompletedSuboperations", 0) or 0),
        failed=int(final.get("NumberOfFailedSuboperations", 0) or 0),
        warning=int(final.get("NumberOfWarningSuboperations", 0) or 0),
    )
