"""``cxr-gateway export-training``: the site's labelled studies as training data for ``monai_train``.

Layout (what ``python -m monai_train finetune --images DIR/images --labels DIR/labels.csv`` reads)::

    DIR/images/<study>/<instance>.dcm   every received instance of each labelled study
    DIR/labels.csv                      Image Index (the file name), Finding Labels (| or No Finding),
                                        Patient ID

De-identified by default (``deidentify``): Patient ID and Name become a stable pseudonym and every UID a
new one, each an HMAC-SHA256 of the original under the gateway's export secret (CXR_EXPORT_SECRET, or
one generated once into data_dir/export-secret), so two exports agree and a patient's studies stay
together (the patient-wise split needs that); the attributes of a basic profile (after DICOM PS3.15
Annex E's Basic Application Level Confidentiality Profile: every person name, date and time, the
identifiers, institution and device attributes, free-text comments, private tags) are removed. The
mapping never leaves the gateway: the database holds the originals, the secret recomputes each
pseudonym (:func:`reidentify`). Pixel data are not inspected: burned-in text stays (CR/DX rarely have it;
a site that has it must screen the images). Each exported study gets a ``study_exports`` row, which lets
retention purge it (CXR_RETENTION_KEEP_LABELLED).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import Instance, Study, StudyExport
from service.core.settings import Settings
from service.site.validation import labelled_cases

# The secret's file name under the data dir (bandit B105 reads the name as a password).
SECRET_FILE = "export-secret"  # nosec B105
NO_FINDING = "No Finding"
# Identifying attributes removed besides every PN, DA, DT and TM element and the private tags.
REMOVED = (
    "AccessionNumber",
    "AdditionalPatientHistory",
    "AdmittingDiagnosesDescription",
    "DeviceSerialNumber",
    "EthnicGroup",
    "ImageComments",
    "InstitutionAddress",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "IssuerOfPatientID",
    "MedicalRecordLocator",
    "MilitaryRank",
    "Occupation",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "PatientAddress",
    "PatientAge",
    "PatientComments",
    "PatientSex",
    "PatientSize",
    "PatientTelephoneNumbers",
    "PatientWeight",
    "ReferencedPatientSequence",
    "ReferencedStudySequence",
    "RequestAttributesSequence",
    "StationName",
    "StudyDescription",
    "SeriesDescription",
    "StudyID",
    "ProtocolName",
    "PerformedProcedureStepID",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
)
UID_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "SynchronizationFrameOfReferenceUID",
)


def export_secret(settings: Settings) -> bytes:
    """CXR_EXPORT_SECRET, or the one generated once into the data dir (mode 0600)."""
    if settings.export_secret is not None:
        return settings.export_secret.get_secret_value().encode()
    path = settings.data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
    return path.read_text().strip().encode()


@dataclass(frozen=True)
class Pseudonyms:
    secret: bytes

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def patient(self, patient_id: str) -> str:
        return "P" + self._digest("patient", patient_id).hex()[:15].upper()

    def uid(self, uid: str) -> str:
        # 2.25.<integer>: a UID from 120 bits of the HMAC (at most 41 characters).
        return "2.25." + str(int.from_bytes(self._digest("uid", uid)[:15], "big"))


def deidentify(ds: Dataset, names: Pseudonyms, patient_key: str) -> Dataset:
    """The instance without identifying attributes, its patient and UIDs pseudonymous (in place)."""
    ds.remove_private_tags()
    for elem in list(ds.iterall()):
        if elem.VR in {"PN", "DA", "DT", "TM"}:
            elem.value = None  # emptied in nested items too (a sequence's deletion is by its keyword)
    for keyword in REMOVED:
        if keyword in ds:
            delattr(ds, keyword)
    for elem in list(ds):
        if elem.VR in {"PN", "DA", "DT", "TM"}:
            del ds[elem.tag]
    pseudonym = names.patient(patient_key)
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    for keyword in UID_KEYWORDS:
        if keyword in ds:
            setattr(ds, keyword, names.uid(str(getattr(ds, keyword))))
    for item in ds.get("SourceImageSequence", []) or []:
        item.ReferencedSOPInstanceUID = names.uid(str(item.ReferencedSOPInstanceUID))
    if getattr(ds, "file_meta", None) is not None and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "cxr-gateway: PS3.15 E.1 basic subset, HMAC pseudonyms"
    return ds


@dataclass
class ExportReport:
    out: Path
    studies: int = 0
    files: int = 0
    missing_files: int = 0  # purged or lost spool files (their studies are exported without them)
    patients: set[str] = field(default_factory=set)


def export_training(
    session: Session, settings: Settings, out: Path, *, identified: bool = False
) -> ExportReport:
    """Write the labelled studies to ``out`` (see the module docstring) and record the exports; the
    caller commits."""
    names = Pseudonyms(export_secret(settings))
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    report = ExportReport(out)
    rows: list[dict[str, str]] = []
    for case in labelled_cases(session):
        study = session.get(Study, case.study_id)
        assert study is not None
        patient_key = study.patient_id or f"study:{study.id}"
        patient = patient_key if identified else names.patient(patient_key)
        present = sorted(f for f, truth in case.truth.items() if truth)
        folder = images / (study.study_instance_uid if identified else names.uid(study.study_instance_uid))
        written = 0
        for inst in session.scalars(select(Instance).where(Instance.study_id == study.id)):
            src = settings.spool_dir / inst.spool_path
            if not src.is_file():
                report.missing_files += 1
                continue
            ds = pydicom.dcmread(src)
            if not identified:
                deidentify(ds, names, patient_key)
            folder.mkdir(exist_ok=True)
            name = f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(folder / name, enforce_file_format=True)
            rows.append(
                {
                    "Image Index": name,
                    "Finding Labels": "|".join(present) or NO_FINDING,
                    "Patient ID": patient,
                }
            )
            written += 1
        if written:
            report.studies += 1
            report.files += written
            report.patients.add(patient)
            session.add(StudyExport(study_id=study.id, export_name=out.name[:255]))
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["Image Index", "Finding Labels", "Patient ID"])
        writer.writeheader()
        writer.writerows(rows)
    logging.getLogger(__name__).info(
        "exported studies=%d files=%d missing=%d", report.studies, report.files, report.missing_files
    )
    return report


def reidentify(session: Session, settings: Settings, pseudonym: str) -> int | None:
    """The study whose Study Instance UID or patient a pseudonym stands for (for the site's own audit)."""
    names = Pseudonyms(export_secret(settings))
    for study in session.scalars(select(Study)):
        if pseudonym in {
            names.uid(study.study_instance_uid),
            names.patient(study.patient_id or f"study:{study.id}"),
        }:
            return study.id
    return None
