"""One Settings object for every process: env vars prefixed ``CXR_`` and an optional TOML file.

Precedence (highest first): explicit keyword arguments, environment, TOML file, defaults.
Settings are built once at process start and passed in; nothing reads them globally.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Discriminator, Field, SecretStr, Tag, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.core.status import DEFAULT_OUTPUTS, Mode
from service.dicomweb.config import DicomwebDestination, DicomwebSource, Outputs
from service.notify.config import Channel as NotifyChannel
from service.notify.config import NotifyRule, check_notify_config

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "worker" / "bundles" / "cxr14_densenet121"


class AeTitled(BaseModel):
    """A DICOM peer's AE title (1-16 characters, no backslash, blanks stripped)."""

    ae_title: str = Field(min_length=1, max_length=16)

    @field_validator("ae_title")
    @classmethod
    def _strip(cls, v: str) -> str:
        return _check_ae_title(v)


class DicomPeer(AeTitled):
    """A DICOM peer we open associations to: its AE title, address and port, TLS or not."""

    host: str
    port: int = Field(ge=1, le=65535)
    # Over TLS (contexts from ``service.core.tls.client_context``): BCP 195, TLS >= 1.2.
    tls: bool = False


class Destination(DicomPeer):
    """A DICOM peer that receives results by C-STORE."""

    # The result objects this peer receives, e.g. ["sr", "report", "sc", "gsps"] (a GSPS is built only
    # for destinations that list it).
    outputs: Outputs = Field(default_factory=lambda: list(DEFAULT_OUTPUTS))
    # C-STORE is the default kind; {"type": "dicomweb", ...} is a DicomwebDestination (STOW-RS).
    type: Literal["dimse"] = "dimse"
    # live: results are sent; shadow: kept on the gateway only. Unset: the global CXR_MODE.
    mode: Mode | None = None


def _destination_type(v: Any) -> str:
    return str(v.get("type", "dimse") if isinstance(v, dict) else getattr(v, "type", "dimse"))


# A destination in CXR_DESTINATIONS: C-STORE unless it says {"type": "dicomweb"}.
AnyDestination = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[DicomwebDestination, Tag("dicomweb")],
    Discriminator(_destination_type),
]


def _check_ae_title(v: str) -> str:
    v = v.strip()
    if not v or "\\" in v:
        raise ValueError("AE title must be 1-16 characters without backslash")
    return v


class Source(AeTitled):
    """A DICOM peer allowed to send to the listener: its calling AE title AND its network address."""

    # An IP address, a CIDR network ("10.1.2.0/24") or a host name resolved when the listener starts.
    host: str = Field(min_length=1)


class QueryRetrievePeer(DicomPeer):
    """The PACS asked for studies to pull: Study Root Q/R (C-FIND, C-MOVE) at this AE and address."""

    host: str = Field(min_length=1)


class DashboardUser(BaseModel):
    """A dashboard account: an argon2/bcrypt ``password_hash`` (or, for tests and demos, a ``password``)."""

    username: str = Field(min_length=1, max_length=64)
    password_hash: SecretStr | None = None
    password: SecretStr | None = None
    # viewer: reads; reader (radiologist): reads, gives finding feedback, imports reference labels;
    # admin: everything.
    role: Literal["admin", "reader", "viewer"] = "viewer"

    @model_validator(mode="after")
    def _one_secret(self) -> DashboardUser:
        if (self.password_hash is None) == (self.password is None):
            raise ValueError(f"dashboard user {self.username!r} needs exactly one of password_hash, password")
        return self


def check_viewer_url(v: str | None) -> str | None:
    """An http(s) URL template whose only placeholder is ``{study_uid}``; empty means unset."""
    if v is None or not v.strip():
        return None
    v = v.strip()
    if not v.lower().startswith(("http://", "https://")):
        raise ValueError("viewer_url must start with http:// or https://")
    try:
        filled = v.format(study_uid="1.2.3")
        used = filled != v.format(study_uid="4.5.6")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(
            "viewer_url may hold no placeholder but {study_uid} (write a literal brace as {{ or }})"
        ) from exc
    if "{study_uid}" not in v or not used:
        raise ValueError("viewer_url must contain {study_uid}")
    if not urlsplit(filled).hostname:
        raise ValueError("viewer_url needs a host name")
    return v


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
            # Accept both a flat file and one with a [cxr] table.
            self._data = dict(raw.get("cxr", raw))

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".cxr-data"), description="Spool, outputs, SQLite database and broker"
    )
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir")
    broker_url: str | None = Field(
        default=None, description="Celery broker; default filesystem broker in data_dir"
    )
    # How often the embedded (filesystem) broker looks for new messages: each hand-over waits up to this.
    broker_poll_seconds: float = Field(default=0.05, gt=0.0, le=5.0)

    listener_ae_title: str = "CXR_GATEWAY"
    # A DICOM listener serves the hospital network: every address by default (bandit B104).
    listener_host: str = "0.0.0.0"  # nosec B104
    listener_port: int = 11112
    study_quiet_seconds: float = Field(default=2.0, ge=0.0, le=3600.0)
    # A normal association release closes its studies after this grace (a next association for the
    # study may open meanwhile); the quiet period still applies to aborted or still-open associations.
    study_release_grace_seconds: float = Field(default=0.2, ge=0.0, le=60.0)
    max_associations: int = Field(default=16, ge=1)
    # Peers allowed to send (calling AE title and source address); empty: any peer (logged at start).
    sources: list[Source] = Field(default_factory=list)
    listener_network_timeout: float = Field(default=60.0, gt=0, description="idle/stalled connection, s")
    listener_acse_timeout: float = Field(default=30.0, gt=0, description="association negotiation, s")
    listener_dimse_timeout: float = Field(default=60.0, gt=0, description="DIMSE message wait, s")
    # On SIGTERM: no new associations; open ones get this long to finish before they are aborted.
    listener_drain_seconds: float = Field(default=30.0, ge=0.0)
    # Refuse C-STOREs (0xA700, the sender retries) while the spool's file system has less free space.
    spool_min_free_bytes: int = Field(default=1024**3, ge=0)
    spool_min_free_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    # TLS (BCP 195 non-downgrading: TLS >= 1.2). The TLS listener runs on its own port beside the plain one.
    listener_tls_port: int | None = Field(default=None, ge=1, le=65535)
    listener_plaintext: bool = Field(default=True, description="False: only the TLS port listens")
    tls_certificate: Path | None = Field(default=None, description="PEM certificate (chain) we present")
    tls_private_key: Path | None = Field(default=None, description="PEM private key of tls_certificate")
    tls_ca_certificates: Path | None = Field(default=None, description="PEM CA bundle to verify peers")
    tls_require_client_cert: bool = Field(default=False, description="mutual TLS on the listener")
    tls_check_hostname: bool = Field(default=True, description="verify a destination's name/IP in its cert")

    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8080
    # Accounts (JSON list of DashboardUser); without one the dashboard refuses to start (`serve` on
    # loopback makes a one-time admin instead).
    dashboard_users: list[DashboardUser] = Field(default_factory=list)
    # Signs session cookies; generated into data_dir/dashboard-secret when unset. Set it when several
    # dashboard replicas must accept each other's sessions.
    dashboard_secret: SecretStr | None = None
    dashboard_session_minutes: int = Field(default=480, ge=1, description="absolute session lifetime")
    dashboard_cookie_secure: bool = Field(default=False, description="Secure cookie flag (behind HTTPS)")
    dashboard_login_max_failures: int = Field(default=5, ge=1)
    dashboard_login_window_seconds: int = Field(default=300, ge=1)
    dashboard_metrics_public: bool = Field(default=False, description="serve /metrics without login")
    dashboard_upload_max_bytes: int = Field(default=64 * 1024**2, ge=1)
    # Calling AE title of the dashboard's own C-STOREs (uploads) and C-ECHOs; allow it in `sources`.
    dashboard_ae_title: str = "CXR_DASHBOARD"
    # The site's image viewer: a URL template with {study_uid} (URL-quoted when filled in); the job pages
    # link each study there. Unset: no viewer links.
    viewer_url: str | None = Field(default=None, description="URL template of the site's viewer")

    model_bundle: Path = DEFAULT_BUNDLE
    destinations: list[AnyDestination] = Field(default_factory=list)
    sender_ae_title: str = "CXR_GATEWAY"
    uid_prefix: str = Field(default="1.2.826.0.1.3680043.10.1453.", description="Root for output UIDs")

    worker_concurrency: int = Field(default=1, ge=1)
    # On SIGTERM running tasks get this long to finish; then they are cancelled and handed back to the
    # broker for another worker. Keep it below the orchestrator's kill grace period.
    worker_shutdown_seconds: float = Field(default=60.0, ge=0.0)
    # "threads" runs a worker's tasks as threads of one process sharing one model, so its inference
    # thread can batch images across studies (GPU workers); "prefork" gives each task slot a process.
    worker_pool: Literal["prefork", "threads", "solo"] = "prefork"
    torch_threads: int = Field(default=0, ge=0, description="0 = torch default")
    inference_device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # auto: bf16 (or fp16 where bf16 is missing) autocast on a GPU; on the CPU int8 when the bundle ships
    # its checked int8 graph (models/model.int8.onnx), else fp32.
    inference_precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    # auto: ONNX Runtime on the CPU when the bundle ships models/model.onnx, torch otherwise.
    inference_backend: Literal["auto", "torch", "onnx"] = "auto"
    # Cross-study batching (worker_pool="threads" with worker_concurrency > 1): images per forward pass,
    # and how long the first images wait for others to join them.
    inference_max_batch: int = Field(default=32, ge=1)
    inference_max_wait_ms: float = Field(default=10.0, ge=0.0, le=10_000.0)
    # A failed C-STORE is tried again after base × 2^(n-1) seconds (n: attempts so far), at most
    # delivery_retry_max_seconds apart; after delivery_max_retries retries it is dead-lettered. The due
    # time lives in the delivery's row: the listener sends due deliveries (every delivery_poll_seconds),
    # never a countdown task on the broker.
    delivery_max_retries: int = Field(default=8, ge=0)
    delivery_retry_base_seconds: float = Field(default=5.0, ge=0.0)
    delivery_retry_max_seconds: float = Field(default=30.0, gt=0.0)
    delivery_poll_seconds: float = Field(default=1.0, gt=0.0, le=60.0)
    # One C-STORE delivery attempt's limit for each of association, DIMSE answer and network silence; well
    # under the attempt's lease (service.core.deliveries.ATTEMPT_LEASE, 120 s) so no attempt outlives it.
    delivery_timeout_seconds: float = Field(default=30.0, gt=0.0, le=35.0)
    # Reconciler (runs in the listener): jobs queued or running longer than this are put back on the queue.
    reconcile_interval_seconds: float = Field(default=30.0, gt=0)
    reconcile_queued_after_seconds: float = Field(default=900.0, gt=0)
    reconcile_running_after_seconds: float = Field(default=1800.0, gt=0)
    # Workers write a heartbeat row this often; a running job whose worker has been silent for
    # reconcile_worker_lost_after_seconds (and did not stop cleanly) is re-enqueued at once, without
    # waiting for reconcile_running_after_seconds.
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0)
    reconcile_worker_lost_after_seconds: float = Field(default=60.0, gt=0)
    # A worker that has lost its broker reconnects this many times (Celery's backoff, about 50 min for
    # 100), then exits non-zero without marking a clean stop: its supervisor restarts it, and meanwhile
    # the reconciler treats it as lost.
    worker_broker_max_retries: int = Field(default=100, ge=0)
    # Which queues `cxr-gateway worker` consumes: GPU/CPU inference workers and light delivery workers
    # can be separated ("inference", "delivery").
    worker_queues: list[str] = Field(default_factory=lambda: ["inference", "delivery"])

    log_level: str = "INFO"

    # Input gate (header rules; like MONAI Deploy's series-selection rules). An empty string in a list
    # accepts images where the attribute is absent.
    gate_modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    gate_body_parts: list[str] = Field(default_factory=lambda: ["CHEST", "THORAX", "LUNG", ""])
    gate_view_positions: list[str] = Field(default_factory=lambda: ["PA", "AP", ""])
    gate_min_side: int = Field(default=256, ge=1, description="smallest Rows/Columns analysed")
    decode_timeout_seconds: float = Field(default=30.0, ge=0, description="per-image pixel decode limit")
    # Resource limits for hostile or broken input, checked from the header before any decode. A 4300 px
    # square detector is 18.5 Mpx; 50 Mpx leaves room for any real radiograph.
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="Rows × Columns × frames")
    # Bytes of one received instance: the listener aborts a transfer that passes it, the worker skips
    # a spooled file over it.
    max_instance_bytes: int = Field(default=1024**3, ge=1024)
    # Address space of the subprocess that decodes one image (RLIMIT_AS): a codec that asks for more
    # fails that image (pixel_decode_memory), never the worker.
    decode_memory_limit_bytes: int = Field(default=3 * 1024**3, ge=256 * 1024**2)
    # Largest PDU the listener advertises and accepts (P-DATA); an association that sends a bigger one
    # is aborted before its body is read.
    listener_max_pdu_bytes: int = Field(default=1 << 20, ge=16 * 1024, le=64 << 20)
    # PDU bytes being received at once across all associations; a PDU that would pass it waits (TCP
    # pushes back on the sender) up to listener_network_timeout, then its association is aborted.
    listener_receive_memory_bytes: int = Field(default=64 << 20, ge=1 << 20)

    # Urgent-finding notifications (service.notify; docs/integration.md). Rules: JSON list of NotifyRule,
    # e.g. [{"name": "ptx", "finding": "Pneumothorax"}]; channels: JSON list of hl7 / fhir / webhook
    # channels. A failed send is due again after base × 2^(n-1) s (at most max apart); after
    # notify_max_retries retries it is a dead letter, replayable from the dashboard.
    notify_rules: list[NotifyRule] = Field(default_factory=list)
    notify_channels: list[NotifyChannel] = Field(default_factory=list)
    notify_max_retries: int = Field(default=8, ge=0)
    notify_retry_base_seconds: float = Field(default=5.0, ge=0.0)
    notify_retry_max_seconds: float = Field(default=300.0, gt=0.0)

    # STOW-RS intake (service.dicomweb.stow_server, served by the listener process; docs/integration.md):
    # off until dicomweb_port is set. Each source is a bearer token tied to a name its instances are
    # recorded under. A request over dicomweb_max_request_bytes is refused (413) from its Content-Length,
    # or stopped where its body passes it; one part over max_instance_bytes fails that instance.
    dicomweb_port: int | None = Field(default=None, ge=1, le=65535)
    dicomweb_host: str | None = Field(default=None, description="bind address; unset: listener_host")
    dicomweb_sources: list[DicomwebSource] = Field(default_factory=list)
    dicomweb_max_request_bytes: int = Field(default=4 * 1024**3, ge=1024)
    # Pull from the PACS (service.dicomnet.qr): the Q/R peer asked by C-FIND and C-MOVE, and the AE title
    # it moves studies to (its entry for our listener; default listener_ae_title).
    pull_peer: QueryRetrievePeer | None = None
    pull_move_ae_title: str | None = Field(default=None, max_length=16)
    pull_timeout_seconds: float = Field(default=600.0, gt=0.0, description="one C-MOVE, all instances")
    pull_poll_seconds: float = Field(default=1.0, gt=0.0, le=60.0)

    # Retention (service.core.retention): a study's spooled images and its jobs' outputs are deleted this
    # many days after its last job is final with every delivery delivered (never before), by the
    # listener every retention_interval_seconds and by `cxr-gateway purge`. Studies with reference
    # labels or reader feedback are kept until exported for training while retention_keep_labelled.
    retention_days: float = Field(default=30.0, gt=0.0)
    retention_keep_labelled: bool = True
    retention_interval_seconds: float = Field(default=3600.0, gt=0.0)

    # The site loop (service.site): the default mode of destinations that name none (shadow: jobs run and
    # their outputs stay on the gateway, nothing is sent); the population stability index above which a
    # drift item is flagged, over drift_weeks weekly windows; the HMAC key of export-training's
    # pseudonyms (generated into data_dir/export-secret when unset; keep it to keep pseudonyms stable).
    mode: Mode = Mode.LIVE
    drift_psi_warn: float = Field(default=0.2, gt=0.0)
    drift_weeks: int = Field(default=8, ge=1, le=104)
    export_secret: SecretStr | None = None

    @model_validator(mode="after")
    def _resolve_modes(self) -> Settings:
        # Each destination's effective mode, so the worker reads one field and never the default.
        for dest in self.destinations:
            if dest.mode is None:
                dest.mode = self.mode
        return self

    @model_validator(mode="after")
    def _check_notify(self) -> Settings:
        check_notify_config(self.notify_rules, self.notify_channels)
        return self

    @model_validator(mode="after")
    def _check_dicomweb(self) -> Settings:
        names = [d.ae_title for d in self.destinations if isinstance(d, DicomwebDestination)]
        if len(set(names)) != len(names):
            raise ValueError("destinations: DICOMweb destination names must be unique")
        sources = [s.name for s in self.dicomweb_sources]
        if len(set(sources)) != len(sources):
            raise ValueError("dicomweb_sources: names must be unique")
        dicom_ports = {self.listener_port, self.listener_tls_port}
        if self.dicomweb_port is not None and self.dicomweb_port in dicom_ports:
            raise ValueError("dicomweb_port must differ from the DICOM listener's ports")
        return self

    @field_validator("viewer_url")
    @classmethod
    def _check_viewer_url(cls, v: str | None) -> str | None:
        return check_viewer_url(v)

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.listener_tls_port is not None and not (self.tls_certificate and self.tls_private_key):
            raise ValueError("listener_tls_port needs tls_certificate and tls_private_key")
        if self.tls_require_client_cert and self.tls_ca_certificates is None:
            raise ValueError("tls_require_client_cert needs tls_ca_certificates to verify clients")
        if not self.listener_plaintext and self.listener_tls_port is None:
            raise ValueError("listener_plaintext=false needs listener_tls_port")
        if self.listener_receive_memory_bytes < self.listener_max_pdu_bytes:
            raise ValueError("listener_receive_memory_bytes must hold at least one listener_max_pdu_bytes")
        if self.reconcile_worker_lost_after_seconds < 2 * self.worker_heartbeat_seconds:
            # One late heartbeat (a busy database, a GC pause) must not re-run a healthy worker's jobs.
            raise ValueError(
                "reconcile_worker_lost_after_seconds must be at least 2 × worker_heartbeat_seconds"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = _CONFIG_PATH.get("path")
        return (init_settings, env_settings, _TomlSource(settings_cls, toml_path))

    # Derived locations -------------------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def output_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def tmp_dir(self) -> Path:
        """Scratch files (decoded pixels, library caches): nothing is written outside data_dir."""
        return self.data_dir / "tmp"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'cxr.sqlite').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"


_CONFIG_PATH: dict[str, Path | None] = {"path": None}


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build Settings from defaults, an optional TOML file, the environment and overrides."""
    _CONFIG_PATH["path"] = Path(config) if config else None
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_PATH["path"] = None
