"""A worker that loses its broker either reconnects or dies as lost: never a clean stop it was not asked for.

Real peers: a private redis-server killed with -9 (the shared test Redis is never touched that way), a real
``python -m worker`` process, SQLite.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kombu import Connection, Queue
from kombu.transport import redis as kombu_redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import make_session_factory, migrate
from service.core.models import Worker
from service.core.settings import load_settings
from service.core.workers import WorkerState, state
from tests.support.peers import require_peer
from tests.support.redis_server import RedisServer
from tests.support.rows import add_job

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    require_peer("redis-server")
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    try:
        yield server
    finally:
        server.kill9()


def test_kombu_restore_after_the_broker_dropped_is_reproduced_and_guarded(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu's Redis transport hands unacknowledged messages back through a connection Celery has
    already collected after the connection error: ``'NoneType' object has no attribute 'hostname'``,
    which killed both workers in the fault run. Guarded, the worker goes on and the message is kept."""
    from worker.broker import guard_restore_unacked

    def held_message_after_broker_loss() -> kombu_redis.Channel:
        conn = Connection(private_redis.url())
        queue = Queue(f"q-{secrets.token_hex(3)}")
        with conn.Producer() as producer:
            producer.publish({"job": 1}, routing_key=queue.name, declare=[queue])
        consumer = conn.Consumer([queue], callbacks=[lambda body, message: None], accept=["json"])
        consumer.consume()
        conn.drain_events(timeout=5)  # received, not acknowledged (late acks)
        channel: kombu_redis.Channel = consumer.channel
        assert len(channel.qos._delivered) == 1
        private_redis.kill9()
        with pytest.raises(conn.connection_errors):
            conn.drain_events(timeout=5)
        conn.collect()  # what Celery's consumer does with a connection that failed
        channel._disconnect_pools()  # the first step of the channel's close
        return channel

    unguarded = getattr(kombu_redis.QoS.restore_unacked, "__wrapped__", kombu_redis.QoS.restore_unacked)
    monkeypatch.setattr(kombu_redis.QoS, "restore_unacked", unguarded)
    channel = held_message_after_broker_loss()
    with pytest.raises(AttributeError, match="hostname"):
        channel.qos.restore_unacked()

    private_redis.start()
    guard_restore_unacked()
    channel = held_message_after_broker_loss()
    channel.qos.restore_unacked()  # logged, not raised
    private_redis.start()  # from its append-only file: the message the worker held is still there
    import redis

    client = redis.Redis.from_url(private_redis.url())
    try:
        assert client.hlen("unacked") == 2  # one from each round; Redis returns them after the timeout
    finally:
        client.close()


def test_a_worker_that_loses_its_broker_for_good_exits_non_zero_and_is_not_marked_stopped(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """Before: Celery gave up reconnecting, the worker exited 0 and marked a clean stop, so the
    reconciler saw it as stopped, not lost, and ``Restart=on-failure`` left it down."""
    settings = load_settings(data_dir=tmp_path / "data")
    migrate(settings)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CXR_")},
        "CXR_DATA_DIR": str(settings.data_dir),
        "CXR_BROKER_URL": private_redis.url(),
        "CXR_WORKER_QUEUES": '["delivery"]',  # no model to load: starts in seconds
        "CXR_WORKER_HEARTBEAT_SECONDS": "1",
        "CXR_RECONCILE_WORKER_LOST_AFTER_SECONDS": "3",
        "CXR_WORKER_BROKER_MAX_RETRIES": "1",
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker"], env=env, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT
        )
    sessions = make_session_factory(settings)
    try:
        deadline = time.monotonic() + 120
        while not _rows(sessions):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        private_redis.kill9()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 75, log.read_text()
    (row,) = _rows(sessions)
    assert row.stopped_at is None, log.read_text()
    later = datetime.now(UTC) + timedelta(seconds=4)
    assert state(row, later, timedelta(seconds=3)) == WorkerState.LOST


def _rows(sessions: sessionmaker[Session]) -> list[Worker]:
    with sessions() as s:
        return list(s.scalars(select(Worker)))


def test_a_stop_that_interrupts_a_job_hands_it_back_instead_of_failing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold shutdown's SystemExit reached a pool process while monai looked up the network class, which
    wraps it (pydoc's ErrorDuringImport): the job was failed as a crash instead of going back to the
    broker (seen once in test_shutdown's hand-back test)."""
    import pydoc

    import worker.tasks
    from service.core import task_names as names
    from service.core.models import Job
    from service.core.status import JobStatus
    from worker.app import make_app
    from worker.runtime import Runtime

    settings = load_settings(data_dir=tmp_path)
    migrate(settings)
    sessions = make_session_factory(settings)
    with sessions.begin() as s:
        add_job(s, id="j" * 32, status=JobStatus.RUNNING, attempts=1)
    app = make_app(Runtime(settings=settings, sessions=sessions))

    def stopped_during_model_load(*args: object, **kwargs: object) -> list[int]:
        try:
            raise SystemExit(-241)  # billiard's cold-shutdown handler in the pool process
        except SystemExit:
            raise pydoc.ErrorDuringImport("monai.networks.nets.DenseNet121", sys.exc_info()) from None

    monkeypatch.setattr(worker.tasks, "process_study", stopped_during_model_load)
    with pytest.raises(SystemExit):
        app.tasks[names.PROCESS_STUDY].run("j" * 32)
    with sessions() as s:
        assert s.get(Job, "j" * 32).status == JobStatus.RUNNING  # type: ignore[union-attr]
