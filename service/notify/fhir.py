"""FHIR R4 for an urgent finding: a transaction Bundle with a DiagnosticReport and its Observation,
validated against the R4 (4.0.1) models of fhirclient (SMART on FHIR) before it leaves (pure functions).

Why fhirclient: fhir.resources 7 and 8 (the pydantic-2 line) model R5 with R4B and STU3 subpackages, but
not R4; its R4 release (6.4.0) needs pydantic 1 and does not import beside the project's pydantic 2
(6.5.0 is already R4B). fhirclient 4.x is generated from FHIR 4.0.1, maintained, pure Python, and its
strict parsing refuses unknown elements, missing required ones and malformed primitives.

Idempotent on the server: each entry is a conditional create (``ifNoneExist`` on the identifier that
is stable across retries), so a retry after a lost response does not create a second report.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from fhirclient.models.bundle import Bundle

from service.notify import codes
from service.notify.config import Priority
from service.notify.message import Urgent

IDENTIFIER_SYSTEM = "urn:cxr-gateway:notification"
PRIORITY_EXTENSION = "urn:cxr-gateway:fhir:StructureDefinition:priority"
_REQUEST_PRIORITY = "http://hl7.org/fhir/request-priority"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


class FhirInvalid(ValueError):
    """The built resource does not pass the R4 models (a bug here, never the receiver's fault)."""


def _coding(code: codes.Code) -> dict[str, Any]:
    return {"system": code.fhir_system, "code": code.code, "display": code.display}


def _ts(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")


def build_bundle(msg: Urgent, now: datetime) -> dict[str, Any]:
    """The transaction Bundle as JSON-ready dict (validated; raises FhirInvalid if it would not be R4)."""
    key = f"{msg.job_id}-{msg.rule}-r{msg.revision}"
    report_url = f"urn:uuid:{_uuid(key, 'report')}"
    obs_url = f"urn:uuid:{_uuid(key, 'observation')}"
    status = "corrected" if msg.corrected else "final"
    critical = msg.priority == Priority.STAT
    subject = {"identifier": {"value": msg.patient_id}} if msg.patient_id else None
    note = [{"text": codes.DISCLAIMER}]
    score_code = codes.PROBABILITY if msg.score_kind == "probability" else codes.SCORE
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": f"{key}-obs"}],
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                    }
                ]
            }
        ],
        "code": {"coding": [_coding(codes.finding(msg.label))], "text": msg.label.replace("_", " ")},
        "effectiveDateTime": _ts(msg.observed_at),
        "issued": _ts(now),
        "valueCodeableConcept": {"coding": [_coding(codes.PRESENT)]},
        # AA critical abnormal for a stat rule, A abnormal otherwise: the R4 way to flag urgency here.
        "interpretation": [{"coding": [{"system": _INTERPRETATION, "code": "AA" if critical else "A"}]}],
        "method": {"text": f"{msg.bundle_name} {msg.bundle_version}"},
        "component": [
            {
                "code": {"coding": [_coding(score_code)]},
                "valueQuantity": {
                    "value": round(msg.score, 4),
                    "unit": "1",
                    "system": "http://unitsofmeasure.org",
                    "code": "1",
                },
            }
        ],
        "derivedFrom": [
            {
                "type": "ImagingStudy",
                "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{msg.study_instance_uid}"},
            }
        ],
        "note": note,
    }
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": key}],
        # The worklist hint (DiagnosticReport has no priority element in R4): request-priority codes.
        "extension": [
            {
                "url": PRIORITY_EXTENSION,
                "valueCoding": {"system": _REQUEST_PRIORITY, "code": msg.priority.value},
            }
        ],
        "status": status,
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
        ],
        "code": {"coding": [_coding(codes.REPORT)], "text": "AI chest X-ray urgent finding"},
        "effectiveDateTime": _ts(msg.observed_at),
        "issued": _ts(now),
        "imagingStudy": [
            {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{msg.study_instance_uid}"}}
        ],
        "result": [{"reference": obs_url}],
        "conclusion": (
            f"{msg.label.replace('_', ' ')}: present ({msg.score_kind} {msg.score:.2f}). {codes.DISCLAIMER}."
        ),
    }
    if msg.accession_number:
        # The order the report answers, by its accession number (v2 table 0203 ACSN).
        report["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}
                        ]
                    },
                    "value": msg.accession_number,
                },
            }
        ]
    if subject:
        report["subject"] = subject
        observation["subject"] = subject
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _entry(report_url, report, "DiagnosticReport", key),
            _entry(obs_url, observation, "Observation", f"{key}-obs"),
        ],
    }
    validate(bundle)
    return bundle


def _entry(full_url: str, resource: dict[str, Any], kind: str, ident: str) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": kind,
            "ifNoneExist": f"identifier={IDENTIFIER_SYSTEM}|{ident}",
        },
    }


def _uuid(key: str, what: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{IDENTIFIER_SYSTEM}:{key}:{what}"))


# Required bindings the models do not check (fhirclient checks structure, types and cardinality).
_STATUS_CODES = {
    "DiagnosticReport": {
        "registered", "partial", "preliminary", "final", "amended", "corrected", "appended", "cancelled",
        "entered-in-error", "unknown",
    },
    "Observation": {
        "registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error",
        "unknown",
    },
}  # fmt: skip
_BUNDLE_TYPES = {"transaction", "batch"}
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}


def validate(bundle: dict[str, Any]) -> None:
    """Parse the Bundle (and so every resource in it) strictly with the R4 models, then check the
    required code bindings of the elements set here."""
    try:
        Bundle(json.loads(json.dumps(bundle)), strict=True)
    except Exception as exc:  # fhirclient's FHIRValidationError, or a TypeError deep in a model
        raise FhirInvalid(str(exc)) from exc
    if bundle.get("type") not in _BUNDLE_TYPES:
        raise FhirInvalid(f"Bundle.type {bundle.get('type')!r} is not a transaction or batch")
    for n, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource", {})
        allowed = _STATUS_CODES.get(resource.get("resourceType", ""))
        if allowed is not None and resource.get("status") not in allowed:
            raise FhirInvalid(f"entry {n}: status {resource.get('status')!r} not in the R4 value set")
        if entry.get("request", {}).get("method") not in _METHODS:
            raise FhirInvalid(f"entry {n}: request.method is not an HTTP verb")


def operation_outcome_text(body: bytes) -> str:
    """The issues of an OperationOutcome (severity, code, details/diagnostics), or a short body excerpt."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", errors="replace")
    if not isinstance(data, dict) or data.get("resourceType") != "OperationOutcome":
        return json.dumps(data)[:300]
    parts = []
    for issue in data.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        said = (issue.get("details") or {}).get("text") or issue.get("diagnostics") or ""
        parts.append(f"{issue.get('severity', '?')} {issue.get('code', '?')}: {said}".strip())
    return "; ".join(parts)[:1000]


def to_json(bundle: dict[str, Any]) -> bytes:
    return json.dumps(bundle, separators=(",", ":")).encode()
