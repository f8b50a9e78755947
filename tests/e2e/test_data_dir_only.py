"""Nothing is written outside the data directory: a study through `cxr-gateway serve` with HOME,
TMPDIR and XDG_CACHE_HOME pointing at empty folders leaves them empty.

Before: ONNX Runtime wrote ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}
and $TMPDIR/.ses when the worker imported it.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses


def test_a_study_writes_nothing_outside_the_data_directory(tmp_path: Path, shared_dir: Path) -> None:
    outside = {name: tmp_path / name for name in ("home", "tmp", "xdg-cache")}
    for folder in outside.values():
        folder.mkdir()
    env = {
        "HOME": str(outside["home"]),
        "TMPDIR": str(outside["tmp"]),
        "XDG_CACHE_HOME": str(outside["xdg-cache"]),
    }
    source = shared_dir / "dicom" / "chest" / "sc-pa-jpeg-baseline.dcm"
    with GatewayProcesses(tmp_path / "gw", env=env) as gw:
        result = storescu("127.0.0.1", gw.listener_port, [source], called_aet=gw.ae_title)
        assert result.returncode == 0, result.stdout + result.stderr
        jobs = gw.wait_for_jobs(
            lambda js: js and js[0]["status"] in {"done", "failed", "skipped"}, timeout=180
        )
        assert jobs[0]["status"] == "done", gw.log_tail()
        assert gw.api(f"/api/jobs/{jobs[0]['id']}")["result"]["inference"]["backend"] == "onnx"
    written = {
        name: sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        for name, folder in outside.items()
    }
    assert written == {name: [] for name in outside}
