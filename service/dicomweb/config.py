"""Settings models of the DICOMweb destinations and STOW-RS sources (read by ``service.core.settings``;
nothing here touches the network or the database), and the output-list check every destination shares."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, field_validator, model_validator

from service.core.status import DEFAULT_OUTPUTS, Mode, OutputKind

_OUTPUT_NAMES = [kind.value for kind in OutputKind]
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,16}$")


def check_outputs(v: object) -> object:
    """A destination's outputs: names of OutputKind, at least one, none twice (a string is one name)."""
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list | tuple):
        raise ValueError(f"outputs must be a list of {_OUTPUT_NAMES}")
    names = [str(item).strip().lower() for item in v]
    if not names:
        raise ValueError(f"outputs must name at least one of {_OUTPUT_NAMES}")
    unknown = [name for name in names if name not in _OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"unknown outputs {unknown}: choose from {_OUTPUT_NAMES}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"outputs lists {duplicates} more than once")
    return names


Outputs = Annotated[list[OutputKind], BeforeValidator(check_outputs)]


def _check_name(v: str) -> str:
    # The name stands where a C-STORE destination's AE title stands (delivery rows, logs, metrics).
    if not _NAME.match(v):
        raise ValueError("a name is 1-16 letters, digits, '_', '.' or '-'")
    return v


class DestinationAuth(BaseModel):
    """HTTP authentication of a DICOMweb destination; secrets are read from files at each send (a rotated
    password or token needs no restart) and never logged."""

    type: Literal["basic", "bearer"]
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> DestinationAuth:
        if self.type == "basic" and not (self.username and self.password_file):
            raise ValueError("basic auth needs username and password_file")
        if self.type == "bearer" and self.token_file is None:
            raise ValueError("bearer auth needs token_file")
        return self


class DicomwebDestination(BaseModel):
    """A DICOMweb archive that receives results by STOW-RS (``POST {url}/studies``).

    Its delivery rows name it like a C-STORE peer: ``ae_title`` is its ``name``, ``host`` its URL and
    ``port`` the URL's port, so deliveries, retries, dead letters and replays are the same rows.
    """

    type: Literal["dicomweb"]
    name: str
    # The DICOMweb root, e.g. http://pacs:8042/dicom-web (STOW-RS is POSTed to {url}/studies).
    url: str = Field(max_length=255)
    auth: DestinationAuth | None = None
    outputs: Outputs = Field(default_factory=lambda: list(DEFAULT_OUTPUTS))
    timeout_seconds: float = Field(default=30.0, gt=0.0, le=600.0)
    mode: Mode | None = None  # live / shadow; unset: the global CXR_MODE (service.core.settings)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v.strip())

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        parts = urlsplit(v)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.query or parts.fragment:
            # Credentials belong in auth (files), never in a URL that reaches logs and the dashboard.
            raise ValueError("url may hold no user, password, query or fragment")
        return v

    @property
    def ae_title(self) -> str:
        return self.name

    @property
    def host(self) -> str:
        return self.url

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")


class DicomwebSource(BaseModel):
    """A sender allowed to POST to the STOW-RS endpoint: its bearer token and the name its instances are
    recorded under (where a C-STORE'd instance has the calling AE title)."""

    name: str
    # The token's SHA-256 (hex) or a file holding the token itself; exactly one.
    token_sha256: SecretStr | None = None
    token_file: Path | None = None
    # An IP, a CIDR network or a host name, as for CXR_SOURCES; unset: any address.
    host: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v.strip())

    @model_validator(mode="after")
    def _one_secret(self) -> DicomwebSource:
        if (self.token_sha256 is None) == (self.token_file is None):
            raise ValueError(f"dicomweb source {self.name!r} needs exactly one of token_sha256, token_file")
        if self.token_sha256 is not None and not re.fullmatch(
            r"[0-9a-f]{64}", self.token_sha256.get_secret_value().lower()
        ):
            raise ValueError(f"dicomweb source {self.name!r}: token_sha256 must be 64 hex digits")
        return self
