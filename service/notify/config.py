"""What to notify and where: urgency rules per finding and the channels (HL7 v2 MLLP, FHIR R4, webhook).

Read by Settings (``CXR_NOTIFY_RULES``, ``CXR_NOTIFY_CHANNELS``, JSON lists like ``CXR_DESTINATIONS``);
nothing here touches the network or the database.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Priority(StrEnum):
    """A worklist priority a RIS can map (HL7 v2 table 0027 codes in brackets)."""

    STAT = "stat"  # S
    ASAP = "asap"  # A
    ROUTINE = "routine"  # R

    @property
    def hl7(self) -> str:
        return {"stat": "S", "asap": "A", "routine": "R"}[self.value]


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("a name is 1-64 letters, digits, '_', '.' or '-' (it appears in metrics and logs)")
    return v


def _check_url(v: str) -> str:
    v = v.strip()
    if not v.lower().startswith(("http://", "https://")):
        raise ValueError("url must start with http:// or https://")
    return v


Name = Annotated[str, AfterValidator(_check_name)]
Url = Annotated[str, AfterValidator(_check_url)]


class NotifyRule(BaseModel):
    """A finding that is urgent: present at the bundle's operating point, or at or above ``min_score``."""

    name: Name
    finding: str = Field(min_length=1, description="a label of the model bundle, e.g. Pneumothorax")
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    priority: Priority = Priority.STAT
    # Channel names this rule notifies; None: every configured channel.
    channels: list[str] | None = None


class _Channel(BaseModel):
    name: Name
    timeout_seconds: float = Field(default=10.0, gt=0.0, le=300.0)


class Hl7Channel(_Channel):
    """HL7 v2.5 ORU^R01 over MLLP (original acknowledgment mode)."""

    type: Literal["hl7"]
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    sending_application: str = "CXR_GATEWAY"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: Literal["P", "T", "D"] = "P"


class FhirChannel(_Channel):
    """FHIR R4: a transaction Bundle (DiagnosticReport + Observation) POSTed to ``url`` (the base URL)."""

    type: Literal["fhir"]
    url: Url
    # A file holding a bearer token (read at each send, so a rotated token needs no restart).
    bearer_token_file: Path | None = None


class WebhookChannel(_Channel):
    """A JSON POST signed with HMAC-SHA256 (key from ``secret_file``)."""

    type: Literal["webhook"]
    url: Url
    secret_file: Path


Channel = Annotated[Hl7Channel | FhirChannel | WebhookChannel, Field(discriminator="type")]


AnyChannel = Hl7Channel | FhirChannel | WebhookChannel


def check_notify_config(rules: list[NotifyRule], channels: list[AnyChannel]) -> None:
    """Unique names, and every channel a rule names configured."""
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise ValueError("notify_channels: channel names must be unique")
    rule_names = [r.name for r in rules]
    if len(set(rule_names)) != len(rule_names):
        raise ValueError("notify_rules: rule names must be unique")
    for rule in rules:
        unknown = sorted(set(rule.channels or ()) - set(names))
        if unknown:
            raise ValueError(f"notify rule {rule.name!r} names unknown channels {unknown}")
