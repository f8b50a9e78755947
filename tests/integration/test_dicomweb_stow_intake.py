"""The STOW-RS intake of a real listener (service.dicomweb.stow_server): instances posted over HTTP take
the C-STORE path (spool, row, study assembly) and are answered per instance; bad input gets a clear
status and never costs the instances already accepted."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from service.core.models import Instance
from service.core.status import JobStatus
from service.dicomweb.stow import StoreReport, content_type, multipart_parts
from service.listener_main import Listener
from tests.support.ingest import (
    count,
    ingest_settings,
    instances,
    jobs,
    running_listener,
    spool_files,
    wait_for,
)
from tests.support.net import free_port

CR = "dicom/chest/cr-pa-mono1-j2k-lossy.dcm"
SC = "dicom/chest/sc-pa-jpeg-baseline.dcm"
TOKEN_A, TOKEN_B = "token-of-ris-a", "token-of-router-b"


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
def stow(tmp_path: Path) -> Iterator[Listener]:
    token_file = tmp_path / "token-b"
    token_file.write_text(TOKEN_B + "\n")
    settings = ingest_settings(
        tmp_path,
        dicomweb_port=free_port(),
        dicomweb_sources=[
            {"name": "RIS_A", "token_sha256": _sha(TOKEN_A)},
            # B may post from its network only: 127.0.0.1 is not in it.
            {"name": "ROUTER_B", "token_file": str(token_file), "host": "10.9.0.0/16"},
        ],
        dicomweb_max_request_bytes=16 << 20,
        study_quiet_seconds=0.5,
    )
    with running_listener(settings) as listener:
        yield listener


def _url(listener: Listener, study: str | None = None) -> str:
    base = f"http://127.0.0.1:{listener.settings.dicomweb_port}/dicomweb/studies"
    return f"{base}/{study}" if study else base


def _fresh(path: Path) -> bytes:
    """The file with new study, series and instance UIDs (a study of its own), as Part 10 bytes."""
    ds = dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return _bytes(ds)


def _bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _post(
    listener: Listener, parts: list[bytes], token: str = TOKEN_A, study: str | None = None
) -> httpx.Response:
    boundary = "test-boundary-1234"
    return httpx.post(
        _url(listener, study),
        content=b"".join(multipart_parts(boundary, parts)),
        headers={"Content-Type": content_type(boundary), "Authorization": f"Bearer {token}"},
        timeout=60,
    )


def _report(response: httpx.Response) -> StoreReport:
    assert response.headers["content-type"].startswith("application/dicom+json")
    return StoreReport.from_json(response.json())


def _uid(data: bytes, keyword: str = "SOPInstanceUID") -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).get(keyword))


def test_two_instances_are_stored_recorded_under_the_source_and_assembled(
    stow: Listener, shared_dir: Path
) -> None:
    cr = _fresh(shared_dir / CR)
    sc_ds = dcmread(io.BytesIO(_fresh(shared_dir / SC)))
    sc_ds.StudyInstanceUID = _uid(cr, "StudyInstanceUID")  # one study of two instances
    sc = _bytes(sc_ds)
    response = _post(stow, [cr, sc])
    assert response.status_code == 200, response.text
    report = _report(response)
    assert set(report.stored) == {_uid(cr), _uid(sc)} and report.failed == {}
    rows = instances(stow)
    assert {r.sop_instance_uid for r in rows} == {_uid(cr), _uid(sc)}
    assert {r.calling_ae_title for r in rows} == {"RIS_A"}
    # The spool holds the bytes as posted (fsynced before the answer; content-addressed names).
    assert sorted(p.read_bytes() for p in spool_files(stow.settings)) == sorted([cr, sc])
    # One job for the study, queued by the assembler after the quiet period (the C-STORE path).
    (job,) = wait_for(lambda: [j for j in jobs(stow) if j.status == JobStatus.QUEUED] or None)
    assert job.calling_ae_title == "RIS_A"
    # A re-post of the same bytes is a success with nothing new, as for C-STORE.
    again = _post(stow, [cr])
    assert again.status_code == 200 and set(_report(again).stored) == {_uid(cr)}
    assert count(stow, Instance) == 2


def test_wrong_or_missing_token_is_401_and_another_sources_token_from_elsewhere_is_403(
    stow: Listener, shared_dir: Path
) -> None:
    cr = _fresh(shared_dir / CR)
    assert _post(stow, [cr], token="guess").status_code == 401
    bare = httpx.post(_url(stow), content=b"x", headers={"Content-Type": content_type("b")}, timeout=10)
    assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Bearer")
    # ROUTER_B's token is valid, but B posts only from its own network: not from here.
    assert _post(stow, [cr], token=TOKEN_B).status_code == 403
    assert count(stow, Instance) == 0


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("application/json", 415),
        ('multipart/related; type="application/dicom+json"; boundary=b', 415),
        ("multipart/form-data; boundary=b", 415),
        ('multipart/related; type="application/dicom"', 400),  # no boundary
        ('multipart/related; type="application/dicom"; boundary=b', 400),  # body has no such boundary
    ],
)
def test_a_body_that_is_not_multipart_related_dicom_is_refused(
    stow: Listener, kind: str, status: int
) -> None:
    response = httpx.post(
        _url(stow),
        content=b"just some text, no parts",
        headers={"Content-Type": kind, "Authorization": f"Bearer {TOKEN_A}"},
        timeout=10,
    )
    assert response.status_code == status, response.text
    assert count(stow, Instance) == 0


def test_a_truncated_part_fails_alone_and_the_instances_before_it_are_kept(
    stow: Listener, shared_dir: Path
) -> None:
    first = _fresh(shared_dir / SC)
    cut = _fresh(shared_dir / CR)
    boundary = "b0undary"
    body = b"".join(multipart_parts(boundary, [first]))
    body = body[: -len(f"--{boundary}--\r\n")]  # no closing delimiter …
    body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + cut[: len(cut) // 2]
    response = httpx.post(
        _url(stow),
        content=body,
        headers={"Content-Type": content_type(boundary), "Authorization": f"Bearer {TOKEN_A}"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    report = _report(response)
    assert set(report.stored) == {_uid(first)}
    assert report.failed == {_uid(cut): 0x0110}  # processing failure: send it again
    assert [r.sop_instance_uid for r in instances(stow)] == [_uid(first)]
    assert not list(stow.staging_dir.glob("stow-*")), "no part file left behind"


def test_a_complete_part_that_is_no_whole_dicom_file_fails_with_the_c_store_status(
    stow: Listener, shared_dir: Path
) -> None:
    good = _fresh(shared_dir / SC)
    broken = _fresh(shared_dir / CR)
    response = _post(stow, [good, broken[: len(broken) - 1000], b"not dicom at all"])
    assert response.status_code == 202, response.text
    report = _report(response)
    assert set(report.stored) == {_uid(good)}
    assert report.failed == {_uid(broken): 0xC210} and report.unnamed == [0xC210]
    only_bad = _post(stow, [b"not dicom at all"])
    assert only_bad.status_code == 409 and _report(only_bad).unnamed == [0xC210]


def test_an_instance_of_another_study_than_the_route_names_fails(stow: Listener, shared_dir: Path) -> None:
    mine, other = _fresh(shared_dir / SC), _fresh(shared_dir / SC)
    response = _post(stow, [mine, other], study=_uid(mine, "StudyInstanceUID"))
    assert response.status_code == 202
    report = _report(response)
    assert set(report.stored) == {_uid(mine)} and report.failed == {_uid(other): 0xA900}


def _raw_request(listener: Listener, head: str, body_chunks: Iterator[bytes]) -> tuple[int, float]:
    """Send a request over a plain socket (a declared length may lie; the body may be endless) and
    return the status line's code and the seconds until it came."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", listener.settings.dicomweb_port), timeout=30) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed while we were still sending: what we test
        reply = b""
        while b"\r\n" not in reply:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    return int(reply.split(b" ")[1]), time.monotonic() - started


def _head(listener: Listener, extra: str) -> str:
    return (
        f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN_A}\r\n"
        f"Content-Type: {content_type('bb')}\r\n{extra}\r\n"
    )


def test_a_huge_declared_length_is_refused_before_any_body_is_read(stow: Listener) -> None:
    status, seconds = _raw_request(stow, _head(stow, "Content-Length: 2147483648\r\n"), iter(()))
    assert status == 413 and seconds < 5


def test_a_streamed_body_over_the_limit_is_stopped_and_the_instances_before_it_are_kept(
    stow: Listener, shared_dir: Path
) -> None:
    """Chunked, no length: one good part, then a part that never ends (the limit is 16 MiB here)."""
    good = _fresh(shared_dir / SC)
    first = b"".join(multipart_parts("bb", [good]))[: -len("--bb--\r\n")]
    sent = {"bytes": 0}

    def endless() -> Iterator[bytes]:
        yield _chunk(first + b"--bb\r\nContent-Type: application/dicom\r\n\r\n")
        block = _chunk(b"\0" * 65536)
        while sent["bytes"] < 256 << 20:  # a client that would send 256 MiB
            sent["bytes"] += 65536
            yield block

    status, _ = _raw_request(stow, _head(stow, "Transfer-Encoding: chunked\r\n"), endless())
    assert status == 413
    assert sent["bytes"] < 128 << 20, "the server stopped reading long before the end"
    assert [r.sop_instance_uid for r in instances(stow)] == [_uid(good)]
    assert not list(stow.staging_dir.glob("stow-*")), "the cut part's file is gone"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_part_over_the_instance_limit_fails_alone(tmp_path: Path, shared_dir: Path) -> None:
    settings = ingest_settings(
        tmp_path,
        dicomweb_port=free_port(),
        dicomweb_sources=[{"name": "RIS_A", "token_sha256": _sha(TOKEN_A)}],
        max_instance_bytes=200_000,  # the SC (127 kB) fits, the CR (677 kB) does not
    )
    with running_listener(settings) as listener:
        small, big = _fresh(shared_dir / SC), _fresh(shared_dir / CR)
        response = _post(listener, [big, small])
        assert response.status_code == 202
        report = _report(response)
        assert set(report.stored) == {_uid(small)} and report.failed == {_uid(big): 0xA700}


@pytest.mark.parametrize("n", [100])
def test_throughput_of_one_request(stow: Listener, shared_dir: Path, n: int, record_property: Any) -> None:
    """Measured: instances per second through one STOW-RS request (SQLite, fsync per instance)."""
    template = dcmread(shared_dir / SC)
    study = generate_uid()
    parts = []
    for _ in range(n):
        template.StudyInstanceUID = study
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        parts.append(_bytes(template))
    started = time.monotonic()
    response = _post(stow, parts)
    seconds = time.monotonic() - started
    assert response.status_code == 200 and len(_report(response).stored) == n
    rate = n / seconds
    record_property("stow_instances_per_second", round(rate, 1))
    print(f"\nSTOW-RS intake: {n} x {len(parts[0]) // 1024} KiB in {seconds:.2f} s = {rate:.1f} instances/s")
