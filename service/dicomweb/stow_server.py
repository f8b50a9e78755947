"""The STOW-RS intake (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]`` with a multipart/related body of
application/dicom parts, each instance taking the exact path of a C-STORE'd one (``Intake.store``: spool
write and fsync, database row, study assembly).

Served by the listener process, on its own port: the listener owns the intake (its fsync pool and
per-instance locks) and the study assembler, whose quiet period an open request holds like an open
association. Not on the dashboard: that app is for people (sessions, CSRF, roles), this one for machines
with a bearer token per source; and the dashboard may not import the listener.

Streamed: a request whose Content-Length passes ``dicomweb_max_request_bytes`` is refused before its body
is read (413), a body that passes it is stopped there; each part goes to a file as it arrives, and a part
over ``max_instance_bytes`` is not written further (that instance fails). Per instance, the answer is
the C-STORE status the same object would get, as Failure Reason: 0xA700 (try again), 0xA900 (not of the
study named, or its UIDs disagree), 0xC210 (cannot be understood); 0x0110 for a part cut short.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import uvicorn
from pydicom import dcmread
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.core.settings import Settings, Source
from service.dicomweb.config import DicomwebSource
from service.dicomweb.stow import (
    DICOM,
    DICOM_JSON,
    FAILED_SOP_SEQUENCE,
    REFERENCED_SOP_SEQUENCE,
    FailureReason,
    sop_item,
)
from service.scp.handlers import AssociationStudies
from service.scp.intake import Intake, Received, StoreStatus
from service.scp.peers import PeerPolicy

log = logging.getLogger(__name__)


_CLOSE = {"Connection": "close"}


class _Refused(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


@dataclass
class _Part:
    """One part being received: its file, its headers, and whether it outgrew the instance limit."""

    path: Path
    fh: IO[bytes]
    size: int = 0
    too_large: bool = False
    header_name: bytes = b""
    headers: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Answer:
    stored: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, sop_class: str, sop_instance: str, reason: int) -> None:
        self.failed.append(sop_item(sop_class, sop_instance, failure=reason))

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.stored:
            out[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": self.stored}
        if self.failed:
            out[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": self.failed}
        return out


class Sources:
    """Bearer tokens to source names (compared as SHA-256 digests, in constant time), with the address
    each source may post from."""

    def __init__(self, sources: list[DicomwebSource]) -> None:
        self._sources = sources
        self._policies = {
            s.name: PeerPolicy([Source(ae_title=s.name, host=s.host)]) for s in sources if s.host is not None
        }

    def identify(self, authorization: str | None, address: str) -> str:
        """The source's name; raises _Refused 401 (no or unknown token) or 403 (not from its address)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refused(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        name = None
        for source in self._sources:
            if hmac.compare_digest(digest, self._digest(source)) and name is None:
                name = source.name
        if name is None:
            raise _Refused(401, "unknown token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        policy = self._policies.get(name)
        if policy is not None and not policy.allows(name, address):
            raise _Refused(403, "this source may not post from this address")
        return name

    @staticmethod
    def _digest(source: DicomwebSource) -> str:
        if source.token_sha256 is not None:
            return source.token_sha256.get_secret_value().lower()
        assert source.token_file is not None
        try:
            # Read at each request: a rotated token needs no restart.
            return hashlib.sha256(source.token_file.read_text().strip().encode()).hexdigest()
        except OSError:
            return ""


def _check_content_type(value: str | None) -> bytes:
    """The boundary of a multipart/related; type="application/dicom" body; raises _Refused 415 or 400."""
    kind, params = parse_options_header(value or "")
    if kind.lower() != b"multipart/related":
        raise _Refused(415, 'only multipart/related; type="application/dicom" is accepted')
    part_type = params.get(b"type", b"").strip(b'"').lower()
    if part_type != DICOM.encode():
        raise _Refused(415, f'only type="{DICOM}" parts are accepted')
    boundary = params.get(b"boundary", b"").strip(b'"')
    if not boundary or len(boundary) > 70:
        raise _Refused(400, "multipart/related without a valid boundary")
    return boundary


class StowIntake:
    """One STOW-RS request's work: stream the parts to files, store each through the intake, answer."""

    def __init__(
        self,
        settings: Settings,
        intake: Intake,
        studies: AssociationStudies,
        touch: Callable[[Collection[int]], None],
        staging: Path,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.studies = studies
        self.touch = touch
        self.staging = staging
        self.sources = Sources(settings.dicomweb_sources)

    async def post(self, request: Request) -> Response:
        try:
            source = self.sources.identify(
                request.headers.get("authorization"), request.client.host if request.client else ""
            )
            boundary = _check_content_type(request.headers.get("content-type"))
            limit = self.settings.dicomweb_max_request_bytes
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise _Refused(413, f"request larger than {limit} bytes")
        except _Refused as exc:
            log.warning("stow-rs refused status=%d detail=%s", exc.status, exc.detail)
            # The body is left unread: close the connection rather than drain it (it may be gigabytes).
            return JSONResponse({"detail": exc.detail}, exc.status, headers={**exc.headers, **_CLOSE})
        study = request.path_params.get("study")
        key = object()  # this request, as the assembler's "open association" holding its studies
        try:
            answer, status = await self._receive(request, boundary, source, study, key)
        finally:
            self.touch(self.studies.pop(key))
        log.info(
            "stow-rs source=%s stored=%d failed=%d status=%d",
            source,
            len(answer.stored),
            len(answer.failed),
            status,
        )
        if status == 400:
            detail = {"detail": "the body is not multipart/related with DICOM parts"}
            return JSONResponse(detail, 400, headers=_CLOSE)
        # 413: the body was read up to the limit only; the rest is not drained, the connection closes.
        headers = _CLOSE if status == 413 else None
        return JSONResponse(answer.body(), status, headers=headers, media_type=DICOM_JSON)

    async def _receive(
        self, request: Request, boundary: bytes, source: str, study: str | None, key: object
    ) -> tuple[_Answer, int]:
        answer = _Answer()
        done: list[_Part] = []
        state: dict[str, Any] = {"part": None}
        per_part = self.settings.max_instance_bytes

        def on_part_begin() -> None:
            fd, name = tempfile.mkstemp(dir=self.staging, prefix="stow-", suffix=".dcm")
            state["part"] = _Part(Path(name), os.fdopen(fd, "wb"))

        def on_part_data(data: bytes, start: int, end: int) -> None:
            part: _Part = state["part"]
            part.size += end - start
            if part.size > per_part:
                part.too_large = True  # not written further; the instance fails
            elif not part.too_large:
                part.fh.write(data[start:end])

        def on_header_field(data: bytes, start: int, end: int) -> None:
            state["part"].header_name += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            part: _Part = state["part"]
            name = part.header_name.lower()
            part.headers[name.decode("latin-1")] = (
                part.headers.get(name.decode("latin-1"), b"") + data[start:end]
            )

        def on_header_end() -> None:
            state["part"].header_name = b""

        def on_part_end() -> None:
            part: _Part = state["part"]
            part.fh.close()
            done.append(part)
            state["part"] = None

        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
            },
        )
        limit = self.settings.dicomweb_max_request_bytes
        received, over = 0, False
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    over = True
                    break
                try:
                    parser.write(chunk)
                except Exception:  # python-multipart's MultipartParseError and friends: not multipart
                    break
                for part in done:
                    await self._store(part, answer, source, study, key)
                done.clear()
        finally:
            unfinished = state["part"]
            if unfinished is not None:
                unfinished.fh.close()
            for part in done:  # parsed but not stored (the stream broke right after)
                part.path.unlink(missing_ok=True)
        if unfinished is not None and not over:
            # Cut short: what the part holds is not the instance; the others of the request stand.
            answer.fail(*_uids(unfinished.path), FailureReason.PROCESSING_FAILURE)
        if unfinished is not None:
            unfinished.path.unlink(missing_ok=True)
        if over:
            return answer, 413
        if not (answer.stored or answer.failed):
            return answer, 400  # no part at all: not a multipart body, or garbage before any boundary
        if not answer.failed:
            return answer, 200
        return answer, 202 if answer.stored else 409

    async def _store(self, part: _Part, answer: _Answer, source: str, study: str | None, key: object) -> None:
        try:
            await run_in_threadpool(self._store_file, part, answer, source, study, key)
        finally:
            part.path.unlink(missing_ok=True)  # the intake moved it into the spool when it took it

    def _store_file(self, part: _Part, answer: _Answer, source: str, study: str | None, key: object) -> None:
        kind = part.headers.get("content-type", b"").split(b";")[0].strip().lower()
        if kind and kind != DICOM.encode():
            answer.fail("", "", StoreStatus.CANNOT_UNDERSTAND)
            return
        if part.too_large:
            answer.fail(*_uids(part.path), StoreStatus.OUT_OF_RESOURCES)
            return
        try:
            ds = dcmread(part.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            meta = ds.file_meta
            sop_class = str(meta.MediaStorageSOPClassUID)
            sop_instance = str(meta.MediaStorageSOPInstanceUID)
            syntax = str(meta.TransferSyntaxUID)
        except Exception:  # not a Part 10 file: pydicom raises many types on garbage
            answer.fail(*_uids(part.path), StoreStatus.CANNOT_UNDERSTAND)
            return
        if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
            answer.fail(sop_class, sop_instance, StoreStatus.SOP_CLASS_MISMATCH)
            return
        outcome = self.intake.store(
            Received(
                path=part.path,
                command_sop_class_uid=sop_class,
                command_sop_instance_uid=sop_instance,
                transfer_syntax_uid=syntax,
                calling_ae_title=source,
            )
        )
        if outcome.study_id is not None:
            self.studies.add(key, outcome.study_id)
        if outcome.status == StoreStatus.SUCCESS:
            answer.stored.append(sop_item(sop_class, sop_instance))
        else:
            answer.fail(sop_class, sop_instance, int(outcome.status))


def _uids(path: Path) -> tuple[str, str]:
    """The SOP Class and Instance UIDs a part's file meta names, or empty ones where it cannot be read."""
    try:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
        return str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
    except Exception:  # a part cut inside its header, or no DICOM at all
        return "", ""


def create_app(stow: StowIntake) -> Starlette:
    return Starlette(
        routes=[
            Route("/dicomweb/studies", stow.post, methods=["POST"]),
            Route("/dicomweb/studies/{study}", stow.post, methods=["POST"]),
        ]
    )


class StowServer:
    """uvicorn serving the STOW-RS app in a thread of the listener process."""

    def __init__(self, settings: Settings, stow: StowIntake) -> None:
        assert settings.dicomweb_port is not None
        config = uvicorn.Config(
            create_app(stow),
            host=settings.dicomweb_host or settings.listener_host,
            port=settings.dicomweb_port,
            log_config=None,
            lifespan="off",
            timeout_keep_alive=30,
            timeout_graceful_shutdown=max(1, round(settings.listener_drain_seconds)),
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="stow-rs", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        stop = threading.Event()
        while not self.server.started and self._thread.is_alive() and not stop.wait(0.05):
            timeout -= 0.05
            if timeout <= 0:
                break
        if not self.server.started:
            raise RuntimeError("the STOW-RS server did not start (port taken?)")

    def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=10)
