"""Reference labels from a CSV file (e.g. the RIS reports' findings): all rows or none.

One row per study: ``StudyInstanceUID`` or ``AccessionNumber``, and ``Findings`` (NIH's
``Finding Labels`` too): the findings present, ``|``-separated, or ``No Finding``. Every finding the model
reports that a row does not list is absent for that study. A file with an unknown study, an unknown
finding or a study twice is refused whole, with the line numbers; nothing of it is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.core.models import LabelImport, ReferenceLabel, Study
from service.site.findings import NO_FINDING, ModelFindings, canonical

UID_COLUMNS = ("studyinstanceuid", "study_instance_uid")
ACCESSION_COLUMNS = ("accessionnumber", "accession_number", "accession")
FINDING_COLUMNS = ("findings", "finding_labels", "labels")
MAX_PROBLEMS = 200  # enough to fix a file by; a file of garbage is not echoed whole


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line of the file (the header is line 1)
    message: str


class LabelFileError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems[:MAX_PROBLEMS]
        super().__init__("; ".join(f"line {p.line}: {p.message}" for p in self.problems))


@dataclass(frozen=True)
class LabelRow:
    line: int
    study_id: int
    present: frozenset[str]


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    keys = [canonical(h) for h in header]
    return next((keys.index(n) for n in names if n in keys), None)


def _findings(cell: str, model: ModelFindings) -> tuple[frozenset[str], list[str]]:
    names = [n.strip() for n in cell.split("|") if n.strip()]
    if not names:
        return frozenset(), ["no findings given (write 'No Finding' for a normal study)"]
    if any(canonical(n) == canonical(NO_FINDING) for n in names):
        return frozenset(), [] if len(names) == 1 else ["'No Finding' together with findings"]
    resolved = [model.resolve(n) for n in names]
    unknown = [n for n, r in zip(names, resolved, strict=True) if r is None]
    if unknown:
        return frozenset(), [f"unknown finding {', '.join(repr(n[:64]) for n in unknown)}"]
    return frozenset(r for r in resolved if r is not None), []


def parse(session: Session, data: bytes, model: ModelFindings) -> list[LabelRow]:
    """The file's rows with their studies found, or LabelFileError naming every bad line."""
    if not model.labels:
        raise LabelFileError([Problem(0, "the model bundle lists no findings to label")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LabelFileError([Problem(1, "the file is not UTF-8 text")]) from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise LabelFileError([Problem(1, "the file is empty")])
    header = rows[0]
    uid_col, acc_col = _column(header, UID_COLUMNS), _column(header, ACCESSION_COLUMNS)
    find_col = _column(header, FINDING_COLUMNS)
    if (uid_col is None and acc_col is None) or find_col is None:
        raise LabelFileError(
            [Problem(1, "the header needs StudyInstanceUID or AccessionNumber, and Findings")]
        )
    problems: list[Problem] = []
    parsed: list[LabelRow] = []
    first_line: dict[int, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines carry nothing
        study_id, why = _study(session, _cell(row, uid_col), _cell(row, acc_col))
        present, errors = _findings(_cell(row, find_col), model)
        problems += [Problem(line, e) for e in ([why] if why else []) + errors]
        if study_id is None:
            continue
        if study_id in first_line:
            problems.append(Problem(line, f"the same study as line {first_line[study_id]} (duplicate row)"))
            continue
        first_line[study_id] = line
        if not errors:
            parsed.append(LabelRow(line, study_id, present))
    if problems:
        raise LabelFileError(problems)
    if not parsed:
        raise LabelFileError([Problem(1, "the file has no label rows")])
    return parsed


def _cell(row: list[str], col: int | None) -> str:
    return row[col].strip() if col is not None and col < len(row) else ""


def _study(session: Session, uid: str, accession: str) -> tuple[int | None, str | None]:
    # The values are the uploader's own; messages do not repeat them (they end up in pages and JSON).
    if uid:
        found = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        return (found, None) if found is not None else (None, "unknown study (StudyInstanceUID)")
    if accession:
        ids = session.scalars(select(Study.id).where(Study.accession_number == accession).limit(2)).all()
        if len(ids) == 1:
            return ids[0], None
        if ids:
            return None, "several studies have this AccessionNumber: give the StudyInstanceUID"
        return None, "unknown study (AccessionNumber)"
    return None, "neither StudyInstanceUID nor AccessionNumber given"


def import_labels(
    session: Session, data: bytes, model: ModelFindings, *, username: str, filename: str | None
) -> LabelImport:
    """Parse and store the file in the caller's transaction (commit it, or nothing is kept). A study
    labelled before gets this file's labels instead."""
    rows = parse(session, data, model)
    record = LabelImport(
        username=username,
        filename=(filename or "")[:255] or None,
        sha256=hashlib.sha256(data).hexdigest(),
        studies=len(rows),
    )
    session.add(record)
    session.flush()
    studies = [r.study_id for r in rows]
    session.execute(delete(ReferenceLabel).where(ReferenceLabel.study_id.in_(studies)))
    session.add_all(
        ReferenceLabel(study_id=r.study_id, finding=f, present=f in r.present, import_id=record.id)
        for r in rows
        for f in model.labels
    )
    session.flush()
    return record


def reference_labels(session: Session, study_ids: list[int]) -> dict[int, dict[str, bool]]:
    """Study id → finding → present, for the studies that have reference labels."""
    out: dict[int, dict[str, bool]] = defaultdict(dict)
    for chunk in range(0, len(study_ids), 500):
        for row in session.execute(
            select(ReferenceLabel.study_id, ReferenceLabel.finding, ReferenceLabel.present).where(
                ReferenceLabel.study_id.in_(study_ids[chunk : chunk + 500])
            )
        ):
            out[row.study_id][row.finding] = row.present
    return dict(out)
