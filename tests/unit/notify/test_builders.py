"""Message builders, parsed back with the libraries a receiver would use: hl7apy (strict HL7 v2.5
ORU_R01 structure) and the fhirclient R4 models; the webhook signature checked as a receiver would."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from service.notify import codes, fhir, hl7v2, webhook
from service.notify.config import Hl7Channel, Priority
from service.notify.hl7v2 import AckKind, read_ack
from tests.unit.notify.conftest import urgent

NOW = datetime(2026, 5, 1, 12, 0, 5, tzinfo=UTC)
CHANNEL = Hl7Channel(type="hl7", name="ris", host="127.0.0.1", port=2575, receiving_application="RIS")


def _parse(text: str):  # type: ignore[no-untyped-def]
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    assert message.validate()
    return message


def test_oru_r01_is_valid_v25_and_carries_what_the_ris_needs() -> None:
    msg = _parse(hl7v2.build_oru(urgent(), CHANNEL, NOW))
    assert msg.msh.msh_9.value == "ORU^R01^ORU_R01"
    assert msg.msh.msh_10.value == "CXR42"
    assert msg.msh.msh_12.value == "2.5"
    result = msg.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert pid.pid_3.value == "PAT7"
    assert pid.pid_5.value == "Doe^Jane^^^Dr"  # DICOM prefix "Dr" moves to XPN component 5
    order = result.oru_r01_order_observation
    assert order.obr.obr_18.value == "ACC1"  # the accession number, as IHE Radiology places it
    assert order.obr.obr_3.obr_3_1.value == "ACC1"
    assert order.obr.obr_27.obr_27_6.value == "S"  # priority stat
    assert order.orc.orc_7.orc_7_6.value == "S"
    assert order.oru_r01_timing_qty.tq1.tq1_9.tq1_9_1.value == "S"
    assert order.obr.obr_25.value == "F"
    values = [o.obx.obx_5.value for o in order.oru_r01_observation]
    assert values == ["52101004^Present^SCT", "0.8731", "cxr14_densenet121 1.2.0", "1.2.3.4"]
    obx = order.oru_r01_observation[0].obx
    assert obx.obx_3.value == "36118008^Pneumothorax^SCT"
    assert obx.obx_8.value == "AA"
    notes = [order.nte.nte_3.value, order.oru_r01_observation[0].nte.nte_3.value]
    assert notes == [codes.DISCLAIMER] * 2


def test_oru_r01_escapes_delimiters_and_marks_a_correction() -> None:
    text = hl7v2.build_oru(
        urgent(
            accession_number="A|1^2&3~4\\5", patient_name="O'Brien^Se\ran", revision=1, priority=Priority.ASAP
        ),
        CHANNEL,
        NOW,
    )
    assert text.count("\r") == 11  # no field broke a segment
    msg = _parse(text)
    order = msg.oru_r01_patient_result.oru_r01_order_observation
    # HL7 escape sequences (\\F\\ field, \\S\\ component, \\T\\ subcomponent, \\R\\ repetition, \\E\\ escape).
    assert order.obr.obr_18.value == "A\\F\\1\\S\\2\\T\\3\\R\\4\\E\\5"
    assert order.obr.obr_25.value == "C"  # a changed result corrects the earlier one
    assert order.obr.obr_27.obr_27_6.value == "A"
    assert order.oru_r01_observation[0].obx.obx_8.value == "A"


@pytest.mark.parametrize(
    ("code", "err", "kind", "reason"),
    [
        ("AA", "", AckKind.ACCEPTED, "hl7_aa"),
        ("CA", "", AckKind.ACCEPTED, "hl7_aa"),
        ("AE", "", AckKind.RETRY, "hl7_ae"),
        ("AR", "", AckKind.REJECTED, "hl7_ar"),
        ("AE", "207", AckKind.RETRY, "hl7_ae_207"),
        ("AE", "101", AckKind.REJECTED, "hl7_ae_101"),
        ("AR", "206", AckKind.RETRY, "hl7_ar_206"),
    ],
)
def test_ack_semantics(code: str, err: str, kind: AckKind, reason: str) -> None:
    segments = ["MSH|^~\\&|RIS|H|CXR|F|20260101||ACK|1|P|2.5", f"MSA|{code}|CXR42|said"]
    if err:
        segments.append(f"ERR|||{err}^x^HL70357|E||||more")
    ack = read_ack("\r".join(segments).encode(), "CXR42")
    assert (ack.kind, ack.reason) == (kind, reason)


def test_an_ack_to_another_message_or_garbage_is_retried() -> None:
    other = read_ack(b"MSH|^~\\&|RIS|H|CXR|F|20260101||ACK|1|P|2.5\rMSA|AA|CXR41", "CXR42")
    assert (other.kind, other.reason) == (AckKind.RETRY, "hl7_ack_mismatch")
    garbage = read_ack(b"HTTP/1.1 400 Bad Request", "CXR42")
    assert garbage.kind == AckKind.RETRY


def test_fhir_bundle_is_r4_valid_and_flags_priority() -> None:
    bundle = fhir.build_bundle(urgent(), NOW)
    report, observation = (e["resource"] for e in bundle["entry"])
    assert report["resourceType"] == "DiagnosticReport"
    assert report["status"] == "final"
    assert report["result"] == [{"reference": bundle["entry"][1]["fullUrl"]}]
    assert report["basedOn"][0]["identifier"]["value"] == "ACC1"
    assert report["extension"][0]["valueCoding"]["code"] == "stat"
    assert codes.DISCLAIMER in report["conclusion"]
    assert observation["code"]["coding"][0]["code"] == "36118008"
    assert observation["interpretation"][0]["coding"][0]["code"] == "AA"
    assert observation["component"][0]["valueQuantity"]["value"] == 0.8731
    assert all(e["request"]["ifNoneExist"].startswith("identifier=") for e in bundle["entry"])
    # Stable across retries: the server's conditional create finds the first copy.
    assert (
        fhir.build_bundle(urgent(), NOW + timedelta(minutes=5))["entry"][0]["fullUrl"]
        == bundle["entry"][0]["fullUrl"]
    )
    assert fhir.build_bundle(urgent(revision=1), NOW)["entry"][0]["resource"]["status"] == "corrected"


@pytest.mark.parametrize(
    "spoil",
    [
        lambda b: b["entry"][1]["resource"].update(bogus=1),  # an element R4 does not have
        lambda b: b["entry"][1]["resource"].pop("code"),  # a required element missing
        lambda b: b["entry"][0]["resource"].update(issued="yesterday"),  # a malformed instant
        lambda b: b["entry"][0]["resource"].update(status="done"),  # outside the required value set
        lambda b: b.update(type="collection"),
    ],
)
def test_fhir_validation_refuses_what_is_not_r4(spoil) -> None:  # type: ignore[no-untyped-def]
    bundle = copy.deepcopy(fhir.build_bundle(urgent(), NOW))
    spoil(bundle)
    with pytest.raises(fhir.FhirInvalid):
        fhir.validate(bundle)


def test_operation_outcome_text() -> None:
    body = json.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "invalid", "diagnostics": "bad ref"}],
        }
    ).encode()
    assert fhir.operation_outcome_text(body) == "error invalid: bad ref"


def test_webhook_signature_verifies_and_refuses_tampering_and_old_requests() -> None:
    body = webhook.build_body(urgent(), NOW)
    headers = webhook.signed_headers(b"s3cret", body, urgent(), NOW)
    ts, sig = headers[webhook.TIMESTAMP_HEADER], headers[webhook.SIGNATURE_HEADER]
    assert webhook.verify(b"s3cret", ts, body, sig, NOW)
    assert not webhook.verify(b"s3cret", ts, body.replace(b"0.8731", b"0.1000"), sig, NOW)
    assert not webhook.verify(b"other", ts, body, sig, NOW)
    assert not webhook.verify(b"s3cret", ts, body, sig, NOW + timedelta(minutes=10))
    payload = json.loads(body)
    assert payload["priority"] == "stat"
    assert payload["accession_number"] == "ACC1"
    assert payload["disclaimer"] == codes.DISCLAIMER
    assert "PAT7" not in body.decode() and "Doe" not in body.decode()  # no patient id or name
