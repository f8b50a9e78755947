"""Proves the REAL-peer test infrastructure works: Orthanc + DCMTK, PostgreSQL, Redis fixtures."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pydicom
import pytest
import redis

from tests.support.dcmtk import echoscu, storescu
from tests.support.net import free_port, wait_for_port
from tests.support.orthanc import OrthancServer
from tests.support.peers import tool

CR_EXPLICIT = "dicom/chest/cr-pa-mono1-explicit-le.dcm"
CR_J2K = "dicom/chest/cr-pa-mono1-j2k-lossless.dcm"
SC_JPEG = "dicom/chest/sc-pa-jpeg-baseline.dcm"
SR_3D = "dicom/sr/tid1500-example.dcm"


def test_storescu_to_orthanc_and_echo(orthanc: OrthancServer, shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / CR_EXPLICIT
    result = storescu("127.0.0.1", orthanc.dicom_port, [source], called_aet=orthanc.aet)
    assert result.returncode == 0, result.stderr

    [instance_id] = orthanc.wait_for_instances(1, timeout=10)
    assert orthanc.instances() == [instance_id]
    tags = orthanc.instance_tags(instance_id)
    assert tags["Modality"] == "CR"

    sent = pydicom.dcmread(source, stop_before_pixels=True)
    received = pydicom.dcmread(orthanc.download_instance(instance_id, tmp_path / "back.dcm"))
    assert received.SOPInstanceUID == sent.SOPInstanceUID
    series = orthanc.series_of_study(str(sent.StudyInstanceUID))
    assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in series] == [sent.SeriesInstanceUID]

    echo = echoscu("127.0.0.1", orthanc.dicom_port, called_aet=orthanc.aet)
    assert echo.returncode == 0, echo.stderr


def test_storescu_auto_proposal_keeps_compressed_syntaxes(orthanc: OrthancServer, shared_dir: Path) -> None:
    # storescu's own default would fail J2K/JPEG files and lacks the 3D SR class; "auto" sends them as-is.
    files = [shared_dir / name for name in (CR_J2K, SC_JPEG, SR_3D)]
    result = storescu("127.0.0.1", orthanc.dicom_port, files, called_aet=orthanc.aet)
    assert result.returncode == 0, result.stderr

    ids = orthanc.wait_for_instances(3, timeout=10)
    stored = {orthanc.rest_get(f"/instances/{i}/metadata/TransferSyntax") for i in ids}
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert stored == expected


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp as an external AE "PEER" accepting every transfer syntax; yields (port, out dir)."""
    storescp_bin = tool("storescp", "dcmtk")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    log = (tmp_path / "storescp.log").open("wb")
    proc = subprocess.Popen(
        [storescp_bin, "-v", "-aet", "PEER", "+xa", "-od", str(out), str(port)], stdout=log, stderr=log
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=10)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_orthanc_stores_to_external_ae(
    orthanc: OrthancServer, shared_dir: Path, storescp: tuple[int, Path]
) -> None:
    port, out = storescp
    upload = orthanc.upload(shared_dir / CR_EXPLICIT)
    orthanc.add_modality("PEER", "PEER", "127.0.0.1", port)
    assert orthanc.echo_modality("PEER")

    answer = orthanc.store_to_modality("PEER", [upload["ID"]])
    assert answer["FailedInstancesCount"] == 0
    assert answer["InstancesCount"] == 1
    [received] = list(out.iterdir())
    assert pydicom.dcmread(received).Modality == "CR"


@pytest.mark.postgres
def test_postgres_url_gives_a_fresh_database(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+psycopg://")
    # psycopg wants a libpq URL: drop SQLAlchemy's "+driver".
    with psycopg.connect(postgres_url.replace("+psycopg", ""), connect_timeout=5) as conn:
        tables = conn.execute("select count(*) from information_schema.tables where table_schema='public'")
        assert tables.fetchone() == (0,)
        conn.execute("create table t (x int)")
        conn.execute("insert into t values (42)")
        assert conn.execute("select x from t").fetchone() == (42,)

    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    try:
        with engine.connect() as sa_conn:
            assert sa_conn.execute(text("select x from t")).scalar_one() == 42
    finally:
        engine.dispose()


@pytest.mark.redis
def test_redis_url_gives_an_empty_database(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        assert client.dbsize() == 0
        client.set("cxr-test-key", "v")
        assert client.get("cxr-test-key") == b"v"
        assert 5 <= int(redis_url.rsplit("/", 1)[1]) <= 14
    finally:
        client.close()
