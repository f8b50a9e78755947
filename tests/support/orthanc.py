"""A real Orthanc PACS for tests: the Debian ``Orthanc`` binary on free ports, with a throw-away config.

Only our temp JSON config is passed on the command line, so nothing from /etc/orthanc (notably its
``"Plugins": ["/usr/share/orthanc/plugins/"]``) is loaded. Storage and index (SQLite) live in the work dir.

Typical use::

    with OrthancServer(modalities={"GATEWAY": ["CXRGW", "127.0.0.1", 11112]}) as pacs:
        storescu("127.0.0.1", pacs.dicom_port, [path], called_aet=pacs.aet)
        ids = pacs.wait_for(lambda: pacs.instances(), timeout=10)
        pacs.store_to_modality("GATEWAY", ids)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from tests.support.net import free_port, wait_for_port
from tests.support.waiting import wait_until

T = TypeVar("T")

HOST = "127.0.0.1"
DEFAULT_BINARY = "/usr/sbin/Orthanc"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
# Debian packages orthanc-dicomweb and orthanc-webviewer.
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"
WEBVIEWER_PLUGIN = PLUGIN_DIR / "libOrthancWebViewer.so"
# DICOMweb for viewers (OHIF): QIDO/WADO-RS under /dicom-web/, WADO-URI at /wado. No "Host": Debian's
# default "localhost" would make the bulk-data links in the metadata point at localhost, not at the origin
# the viewer used (a one-origin proxy).
DICOMWEB_CONFIG: dict[str, Any] = {
    "Enable": True,
    "Root": "/dicom-web/",
    "EnableWado": True,
    "WadoRoot": "/wado",
}


class OrthancError(RuntimeError):
    """Orthanc failed to start, died, or a REST call failed."""


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable ($ORTHANC_BIN, PATH, then the Debian location), None if absent."""
    candidates = [os.environ.get("ORTHANC_BIN"), shutil.which("Orthanc"), DEFAULT_BINARY]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


# Servers still running at interpreter exit (a crashed script, a forgotten stop()): Orthanc runs in its
# own session, so nothing else would ever stop it.
_live: set[OrthancServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        server.stop()


def _reap(proc: subprocess.Popen[bytes] | None, remove: Path | None) -> None:
    if proc is not None:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)


class OrthancServer:
    """Start/stop a private Orthanc instance; small REST helpers around it.

    ``modalities`` maps a modality name to ``[aet, host, port]``: the DICOM peers Orthanc may C-STORE to
    (``store_to_modality``). More can be added at run time with ``add_modality`` (kept in memory only).
    ``workdir`` keeps storage, index, config and log there (e.g. pytest's ``tmp_path``, which survives the
    run for post-mortems); without it a temp dir is created and removed on stop.
    ``extra_config`` is merged last over the defaults below.
    ``dicomweb`` / ``webviewer`` load the DICOMweb plugin (``DICOMWEB_CONFIG``) and the Web Viewer plugin
    (``/web-viewer/app/viewer.html?series=<id>``) by their full paths; by default no plugin is loaded.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Sequence[str | int]] | None = None,
        workdir: Path | None = None,
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = False,
        startup_timeout: float = 30.0,
        binary: str | None = None,
        dicomweb: bool = False,
        webviewer: bool = False,
    ) -> None:
        self.aet = aet
        self.dicomweb = dicomweb
        self.webviewer = webviewer
        self.host = HOST
        self.modalities: dict[str, list[str | int]] = {k: list(v) for k, v in (modalities or {}).items()}
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self.verbose = verbose
        self.startup_timeout = startup_timeout
        self.binary = binary or orthanc_binary() or DEFAULT_BINARY
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.http_port = 0
        self.dicom_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def plugins(self) -> list[str]:
        """Full paths of the plugin libraries this server loads."""
        wanted = ((DICOMWEB_PLUGIN, self.dicomweb), (WEBVIEWER_PLUGIN, self.webviewer))
        return [str(path) for path, on in wanted if on]

    def config(self) -> dict[str, Any]:
        """The JSON config written for the current ports."""
        cfg: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            # Never the Debian plugin folder or any Lua from /etc/orthanc: only the plugins asked for.
            "Plugins": self.plugins,
            "LuaScripts": [],
            "ConcurrentJobs": 2,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": 10,
            "HttpDescribeErrors": True,
            "HttpCompressionEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "SslEnabled": False,
            "ExecuteLuaEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            # Every transfer syntax (this is also the 1.10 default, made explicit).
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "UnknownSopClassAccepted": False,
            "DicomScpTimeout": 30,
            # Short SCU timeout: a broken listener must fail a test fast, not hang it.
            "DicomScuTimeout": 10,
            # Orthanc keeps outgoing associations open 5 s by default; release at once so a listener that
            # acts on A-RELEASE sees the end of the transfer immediately.
            "DicomAssociationCloseDelay": 0,
            "DicomThreadsCount": 4,
            # Studies/series become "stable" quickly, for tests that wait on stability.
            "StableAge": 2,
            "SaveJobs": False,
            "JobsHistorySize": 20,
            "OverwriteInstances": False,
            "HttpTimeout": 10,
            "HttpRequestTimeout": 30,
            # Full patient names/UIDs in the log: it's test data and the log is for debugging.
            "DeidentifyLogs": False,
            "MallocArenaMax": 5,
        }
        if self.dicomweb:
            cfg["DicomWeb"] = dict(DICOMWEB_CONFIG)
        if self.webviewer:
            cfg["WebViewer"] = {"CachePath": str(self.workdir / "webviewer-cache"), "Threads": 2}
        cfg.update(self.extra_config)
        return cfg

    def start(self, attempts: int = 3, *, keep_ports: bool = False) -> OrthancServer:
        """Start Orthanc and wait until REST /system answers; retried on new ports (free_port races).

        ``keep_ports`` restarts a stopped server on its previous ports (a PACS coming back after an outage).
        """
        if self._proc is not None:
            return self
        if not os.access(self.binary, os.X_OK):
            raise OrthancError(f"Orthanc binary not found/executable: {self.binary}")
        if missing := [p for p in self.plugins if not os.path.isfile(p)]:
            raise OrthancError(f"Orthanc plugin(s) not installed: {', '.join(missing)}")
        last_error = ""
        reuse = keep_ports and self.http_port and self.dicom_port
        for _ in range(1 if reuse else attempts):
            if not reuse:
                self.http_port = free_port()
                self.dicom_port = free_port()
                while self.dicom_port == self.http_port:
                    self.dicom_port = free_port()
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            args = [self.binary]
            if self.verbose:
                args.append("--verbose")
            args.append(str(self.config_path))
            with self.log_path.open("ab") as log:
                log.write(f"\n===== starting {' '.join(args)}\n".encode())
                log.flush()
                # Own session: Ctrl-C in pytest must not reach Orthanc before we stop it in order.
                self._proc = subprocess.Popen(
                    args,
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            _live.add(self)
            self._client = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False)
            try:
                self._wait_ready()
                wait_for_port(self.host, self.dicom_port, timeout=self.startup_timeout)
                return self
            except OrthancError as exc:
                last_error = str(exc)
                self._terminate()
        raise OrthancError(f"Orthanc did not start after {attempts} attempts: {last_error}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None and self._client is not None
            if self._proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self._proc.returncode}; log:\n{self.log_tail()}")
            try:
                if self._client.get("/system", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise OrthancError(f"Orthanc REST not up after {self.startup_timeout}s; log:\n{self.log_tail()}")

    def _terminate(self, wait: bool = True, remove: Path | None = None) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is not None and proc.poll() is None:
            # SIGTERM lets Orthanc close its SQLite index cleanly; kill only if it hangs.
            proc.send_signal(signal.SIGTERM)
        if wait:
            _reap(proc, remove)
        else:
            # A clean stop takes ~3.5 s (Civetweb and the DICOM server poll once a second); finish it in a
            # non-daemon thread, which the interpreter joins at exit, so tests don't pay for it.
            threading.Thread(target=_reap, args=(proc, remove), name="orthanc-stop").start()

    def stop(self, wait: bool = True) -> None:
        """Stop Orthanc (SIGTERM, SIGKILL after 15 s); `wait=False` returns at once, reaps in background."""
        self._terminate(wait=wait, remove=self.workdir if self._owns_workdir else None)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------ REST

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise OrthancError("Orthanc is not running")
        return self._client

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            raise OrthancError(
                f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text}"
            )
        return response

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        # Most routes answer JSON; a few (e.g. /instances/{id}/metadata/X, /tools/now) answer plain text.
        if "json" in response.headers.get("content-type", ""):
            return response.json()
        return response.text

    def rest_get(self, path: str, **params: Any) -> Any:
        """GET a REST path (e.g. "/system"); returns the decoded JSON (text for non-JSON answers)."""
        return self._decode(self._check(self.client.get(path, params=params or None)))

    def rest_get_bytes(self, path: str) -> bytes:
        return self._check(self.client.get(path)).content

    def rest_post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """POST JSON (or raw bytes) to a REST path; returns the decoded JSON (or text when not JSON)."""
        kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
        if timeout is not None:
            kwargs["timeout"] = timeout
        return self._decode(self._check(self.client.post(path, **kwargs)))

    def rest_put(self, path: str, body: Any) -> Any:
        return self._decode(self._check(self.client.put(path, json=body)))

    def rest_delete(self, path: str) -> None:
        self._check(self.client.delete(path))

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.rest_get("/system")
        return result

    # ------------------------------------------------------------------ resources

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        return list(self.rest_get("/instances"))

    def studies(self) -> list[str]:
        return list(self.rest_get("/studies"))

    def series(self) -> list[str]:
        return list(self.rest_get("/series"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Simplified tags (keyword → value, sequences as lists of dicts) of one instance."""
        tags: dict[str, Any] = self.rest_get(f"/instances/{instance_id}/simplified-tags")
        return tags

    def download_instance(self, instance_id: str, path: Path | str) -> Path:
        """Write the stored DICOM file (exactly as received) to `path`."""
        target = Path(path)
        target.write_bytes(self.rest_get_bytes(f"/instances/{instance_id}/file"))
        return target

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Resolve a DICOM UID (study/series/SOP instance) to Orthanc resources ({Type, ID, Path})."""
        found: list[dict[str, Any]] = self.rest_post("/tools/lookup", uid.encode())
        return found

    def _resolve(self, resource: str, level: str) -> str:
        # Orthanc ids are dash-separated SHA-1s without dots; DICOM UIDs always contain dots.
        if "." not in resource:
            return resource
        for hit in self.lookup(resource):
            if hit.get("Type") == level:
                return str(hit["ID"])
        raise OrthancError(f"no {level} with UID {resource} in Orthanc")

    def series_of_study(self, study: str) -> list[dict[str, Any]]:
        """Series (full JSON: MainDicomTags, Instances, …) of a study, by Orthanc id or StudyInstanceUID."""
        study_id = self._resolve(study, "Study")
        found: list[dict[str, Any]] = self.rest_get(f"/studies/{study_id}/series")
        return found

    def instances_of_series(self, series: str) -> list[dict[str, Any]]:
        """Instances of a series given its Orthanc id or SeriesInstanceUID."""
        series_id = self._resolve(series, "Series")
        found: list[dict[str, Any]] = self.rest_get(f"/series/{series_id}/instances")
        return found

    def upload(self, path: Path | str) -> dict[str, Any]:
        """POST one DICOM file to /instances (REST, no DICOM); returns Orthanc's answer (ID, Status)."""
        result: dict[str, Any] = self.rest_post("/instances", Path(path).read_bytes())
        return result

    def clear(self) -> None:
        """Delete every patient (and so everything) stored."""
        for patient_id in self.rest_get("/patients"):
            self.rest_delete(f"/patients/{patient_id}")

    # ------------------------------------------------------------------ outgoing DICOM

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a DICOM peer at run time, e.g. a listener started after Orthanc."""
        self.rest_put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})
        self.modalities[name] = [aet, host, port]

    def echo_modality(self, name: str) -> bool:
        """C-ECHO from Orthanc to a declared peer."""
        response = self.client.post(f"/modalities/{name}/echo", json={})
        return response.status_code == 200

    def store_to_modality(
        self, modality_name: str, resource_ids: Iterable[str], *, timeout: float = 60.0
    ) -> dict[str, Any]:
        """C-STORE resources (instance/series/study/patient ids) to a declared peer, synchronously.

        Raises OrthancError on failure (Orthanc answers HTTP 500 when the association or a store fails).
        """
        body = {"Resources": list(resource_ids), "Synchronous": True}
        result: dict[str, Any] = self.rest_post(f"/modalities/{modality_name}/store", body, timeout=timeout)
        return result

    # ------------------------------------------------------------------ polling

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 30.0,
        interval: float = 0.1,
        message: str = "condition",
    ) -> T:
        """Poll `predicate` until it returns something truthy; return that value.

        Raises TimeoutError (with Orthanc's log tail) after `timeout` seconds, OrthancError if Orthanc died.
        """

        def alive() -> None:
            if self._proc is not None and self._proc.poll() is not None:
                raise OrthancError(f"Orthanc died while waiting for {message}; log:\n{self.log_tail()}")

        return wait_until(
            predicate,
            timeout,
            message,
            interval=interval,
            check=alive,
            detail=lambda: f"Orthanc log:\n{self.log_tail()}",
        )

    def wait_for_instances(self, count: int, timeout: float = 30.0) -> list[str]:
        """Wait until at least `count` instances are stored; return their ids."""
        return self.wait_for(
            lambda: ids if len(ids := self.instances()) >= count else [],
            timeout=timeout,
            message=f"{count} instance(s) in Orthanc",
        )
