"""Back-pressure and limits: the PACS is told to retry (0xA700, transient rejections) and the listener
recovers by itself; idle or stalled peers are dropped; big instances stream to disk."""

from __future__ import annotations

import os
import socket
import time
import tracemalloc
import urllib.parse
from pathlib import Path

import numpy as np
import psycopg
import pytest
import redis
from psycopg import sql
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from service.core import task_names
from service.core.models import Instance, Job
from service.core.status import JobStatus
from tests.support.dcmtk import echoscu, storescu
from tests.support.ingest import (
    TcpProxy,
    association,
    count,
    ingest_settings,
    instances,
    jobs,
    running_listener,
    scu,
    spool_files,
    store_status,
    wait_for,
)

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"
POSTGRES_ADMIN_URL = os.environ.get(
    "CXR_TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def _cr(shared_dir: Path, study_uid: str | None = None) -> Dataset:
    ds = dcmread(shared_dir / CR)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


# ---------------------------------------------------------------------------------------------- disk


def test_disk_below_watermark_is_0xA700_until_space_returns(tmp_path: Path, shared_dir: Path) -> None:
    settings = ingest_settings(tmp_path, spool_min_free_bytes=2**62)  # more than any disk has
    ds = _cr(shared_dir)
    with running_listener(settings) as listener:
        with association(scu(), settings) as assoc:
            assert store_status(assoc, ds) == 0xA700
        assert spool_files(settings) == [] and count(listener, Instance) == 0
        # What a PACS sees, and that it may retry.
        path = tmp_path / "cr.dcm"
        ds.save_as(path, enforce_file_format=True)
        refused = storescu("127.0.0.1", settings.listener_port, [path], called_aet="CXR_GATEWAY")
        assert "Refused: OutOfResources" in refused.stderr + refused.stdout

        listener.intake.pressure.min_free_bytes = 0  # space is back (an operator cleaned up)
        with association(scu(), settings) as assoc:
            assert store_status(assoc, ds) == 0x0000
        assert count(listener, Instance) == 1


def test_disk_watermark_in_percent(tmp_path: Path, shared_dir: Path) -> None:
    settings = ingest_settings(tmp_path, spool_min_free_percent=100.0)
    with running_listener(settings), association(scu(), settings) as assoc:
        assert store_status(assoc, _cr(shared_dir)) == 0xA700


# ---------------------------------------------------------------------------------------------- database


@pytest.mark.postgres
def test_database_outage_is_0xA700_and_heals(tmp_path: Path, shared_dir: Path, postgres_url: str) -> None:
    settings = ingest_settings(tmp_path, database_url=postgres_url)
    dbname = urllib.parse.urlsplit(postgres_url).path.lstrip("/")
    with (
        running_listener(settings) as listener,
        psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin,
    ):
        with association(scu(), settings) as assoc:
            assert store_status(assoc, _cr(shared_dir)) == 0x0000
        try:
            # The database goes away: no new connections, and the pooled ones are killed.
            admin.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(dbname))
            )
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
            late = _cr(shared_dir)
            with association(scu(), settings) as assoc:
                assert store_status(assoc, late) == 0xA700
            assert len(spool_files(settings)) == 1, "an unacknowledged instance must not stay in the spool"
        finally:
            admin.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(dbname))
            )
        # Back without a restart: the PACS's retry succeeds.
        with association(scu(), settings) as assoc:
            assert store_status(assoc, late) == 0x0000
        assert count(listener, Instance) == 2
        assert len(spool_files(settings)) == 2


# ---------------------------------------------------------------------------------------------- broker


@pytest.mark.redis
def test_broker_outage_stores_durably_and_queues_the_jobs_when_it_returns(
    tmp_path: Path, shared_dir: Path, redis_url: str
) -> None:
    parts = urllib.parse.urlsplit(redis_url)
    assert parts.hostname is not None and parts.port is not None
    proxy = TcpProxy(parts.hostname, parts.port).start()
    settings = ingest_settings(
        tmp_path, broker_url=f"redis://127.0.0.1:{proxy.port}{parts.path}", study_quiet_seconds=0.3
    )
    try:
        with running_listener(settings) as listener:
            proxy.cut()
            with association(scu(), settings) as assoc:
                assert store_status(assoc, _cr(shared_dir)) == 0x0000
            wait_for(lambda: not listener.pressure.broker_ok, timeout=60)
            # Known to be away now, and still: the file and its rows are durable, the 0x0000 is true.
            with association(scu(), settings) as assoc:
                assert store_status(assoc, _cr(shared_dir)) == 0x0000
            assert count(listener, Instance) == 2 and len(spool_files(settings)) == 2
            # Waiting, none lost: 'received', or 'queued' for the moment the assembler tries the broker
            # again (it puts the job back when the send fails); exactly two messages once it returns.
            assert {j.status for j in jobs(listener)} <= {JobStatus.RECEIVED, JobStatus.QUEUED}
            assert len(jobs(listener)) == 2

            proxy.restore()
            wait_for(lambda: [j.status for j in jobs(listener)] == [JobStatus.QUEUED] * 2, timeout=60)
            assert listener.pressure.broker_ok
        client = redis.Redis.from_url(redis_url)
        try:
            assert client.llen(task_names.INFERENCE_QUEUE) == 2
        finally:
            client.close()
    finally:
        proxy.cut()


# ---------------------------------------------------------------------------------------------- limits


def test_associations_beyond_the_limit_are_rejected_transiently(tmp_path: Path) -> None:
    settings = ingest_settings(tmp_path, max_associations=2)
    with running_listener(settings):
        held = [
            scu().associate("127.0.0.1", settings.listener_port, ae_title="CXR_GATEWAY") for _ in range(2)
        ]
        try:
            assert all(a.is_established for a in held)
            extra = scu().associate("127.0.0.1", settings.listener_port, ae_title="CXR_GATEWAY")
            assert extra.is_rejected
            rj = extra.acceptor.primitive
            assert rj is not None
            # rejected-transient (2), service-provider presentation related (3), local limit exceeded (2).
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
            echo = echoscu("127.0.0.1", settings.listener_port, called_aet="CXR_GATEWAY")
            assert echo.returncode != 0 and "Rejected Transient" in echo.stderr + echo.stdout
        finally:
            held[0].release()
        # A slot is free again: the PACS's retry gets in.
        wait_for(
            lambda: echoscu("127.0.0.1", settings.listener_port, called_aet="CXR_GATEWAY").returncode == 0
        )
        held[1].release()


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the listener closed ``sock`` (reads until EOF); fails after ``seconds``."""
    start = time.monotonic()
    sock.settimeout(seconds)
    while sock.recv(4096):
        pass
    return time.monotonic() - start


def test_silent_stalled_and_idle_peers_are_dropped(tmp_path: Path) -> None:
    settings = ingest_settings(tmp_path, listener_acse_timeout=1.0, listener_network_timeout=1.0)
    with running_listener(settings):
        # Connects and never asks for an association.
        with socket.create_connection(("127.0.0.1", settings.listener_port)) as silent:
            assert _closed_within(silent, 10) < 8
        # Starts an A-ASSOCIATE-RQ PDU (type 1, 200 bytes announced) and stops after 10 of them.
        with socket.create_connection(("127.0.0.1", settings.listener_port)) as stalled:
            stalled.sendall(b"\x01\x00\x00\x00\x00\xc8" + b"\x00" * 10)
            assert _closed_within(stalled, 10) < 8
        # Associates, then goes quiet: aborted by us after the network timeout.
        idle = scu().associate("127.0.0.1", settings.listener_port, ae_title="CXR_GATEWAY")
        assert idle.is_established
        wait_for(lambda: not idle.is_established, timeout=10)
        assert idle.is_aborted
        # And the listener serves the next peer.
        assert echoscu("127.0.0.1", settings.listener_port, called_aet="CXR_GATEWAY").returncode == 0


def test_large_instance_streams_to_disk_not_memory(tmp_path: Path, shared_dir: Path) -> None:
    big = _cr(shared_dir)
    rows, cols = 4096, 5120  # 40 MiB of 16-bit pixels
    big.Rows, big.Columns = rows, cols
    big.PixelData = (np.arange(rows * cols, dtype=np.uint32) % 4096).astype(np.uint16).tobytes()
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    del big
    settings = ingest_settings(tmp_path)
    with running_listener(settings) as listener:
        tracemalloc.start()
        try:
            sent = storescu("127.0.0.1", settings.listener_port, [path], called_aet="CXR_GATEWAY")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert sent.returncode == 0, sent.stderr
        [inst] = instances(listener)
        assert inst.size_bytes > 40 * 2**20
        # The listener held a few PDUs at a time, never the 40 MiB instance.
        assert peak < 12 * 2**20, f"peak Python allocations {peak / 2**20:.1f} MiB"
        assert dcmread(settings.spool_dir / inst.spool_path).PixelData == dcmread(path).PixelData
        assert count(listener, Job) == 1


def test_connection_flood_is_capped_before_any_dicom(tmp_path: Path) -> None:
    # max_associations=1: up to 2*1+4 = 6 connections get a thread (and an A-ASSOCIATE-RJ if need be);
    # beyond that a connection is closed at once, so a flood cannot pile up threads.
    settings = ingest_settings(tmp_path, max_associations=1, listener_acse_timeout=4.0)
    with running_listener(settings):
        silent = [socket.create_connection(("127.0.0.1", settings.listener_port)) for _ in range(6)]
        try:
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", settings.listener_port)) as extra:
                assert _closed_within(extra, 5) < 2
            for sock in silent:
                sock.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    sock.recv(1)  # still open, waiting for its A-ASSOCIATE-RQ
        finally:
            for sock in silent:
                sock.close()
        # The slots come back once those connections are gone (pynetdicom notices at the ACSE timeout).
        wait_for(
            lambda: echoscu("127.0.0.1", settings.listener_port, called_aet="CXR_GATEWAY").returncode == 0
        )
