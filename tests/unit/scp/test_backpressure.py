from __future__ import annotations

from pathlib import Path

from service.core.settings import load_settings
from service.core.status import ReasonCode
from service.scp.backpressure import BackPressure


def _pressure(tmp_path: Path, **kw: object) -> BackPressure:
    settings = load_settings(data_dir=tmp_path, **kw)
    settings.spool_dir.mkdir(parents=True)
    return BackPressure(settings)


def test_watermark_in_bytes_counts_the_incoming_instance(tmp_path: Path) -> None:
    pressure = _pressure(tmp_path, spool_min_free_bytes=0)
    assert pressure.refusal() is None
    assert pressure.refusal(incoming_bytes=2**62) == ReasonCode.SPOOL_DISK_LOW
    pressure.min_free_bytes = 2**62
    assert pressure.refusal() == ReasonCode.SPOOL_DISK_LOW


def test_watermark_in_percent(tmp_path: Path) -> None:
    assert _pressure(tmp_path, spool_min_free_bytes=0, spool_min_free_percent=100).refusal() == (
        ReasonCode.SPOOL_DISK_LOW
    )


def test_a_broker_outage_is_no_reason_to_refuse_a_durable_store(tmp_path: Path) -> None:
    pressure = _pressure(tmp_path, spool_min_free_bytes=0)
    pressure.broker_failed()
    assert not pressure.broker_ok
    assert pressure.refusal() is None  # the spool and the database hold it; the job is queued later
    pressure.broker_succeeded()
    assert pressure.broker_ok and pressure.refusal() is None


def test_missing_spool_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    pressure = BackPressure(load_settings(data_dir=tmp_path / "absent"))
    assert pressure.refusal() == ReasonCode.SPOOL_WRITE_FAILED
