"""The GPU worker's set-up, run on the CPU: a thread-pool worker batching studies into shared passes."""

from __future__ import annotations

from pathlib import Path

from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses
from tests.support.orthanc import OrthancServer
from tests.support.studies import with_fresh_uids


def test_a_thread_pool_worker_batches_studies_and_delivers_each(
    tmp_path: Path, orthanc: OrthancServer, shared_dir: Path
) -> None:
    src = shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm"
    files = [with_fresh_uids(src, tmp_path / f"in/{i}.dcm") for i in range(4)]
    env = {
        "CXR_WORKER_POOL": "threads",
        "CXR_WORKER_CONCURRENCY": "4",
        "CXR_INFERENCE_MAX_BATCH": "8",
        "CXR_INFERENCE_MAX_WAIT_MS": "3000",  # generous: the tasks decode at different speeds on 2 cores
    }
    destination = [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    with GatewayProcesses(
        tmp_path / "gw", commands=("listener", "worker", "dashboard"), destinations=destination, env=env
    ) as gw:
        try:
            sent = storescu("127.0.0.1", gw.listener_port, files, called_aet=gw.ae_title)
            assert sent.returncode == 0, sent.stderr
            jobs = gw.wait_for_jobs(
                lambda js: (
                    len(js) == 4
                    and all(
                        j["deliveries"] and all(d["status"] == "delivered" for d in j["deliveries"])
                        for j in js
                    )
                ),
                timeout=240,
            )
            details = [gw.api(f"/api/jobs/{j['id']}") for j in jobs]
        except BaseException:
            print(gw.log_tail(200))
            raise
    assert all(d["status"] == "done" for d in details)
    inference = [d["result"]["inference"] for d in details]
    assert {i["device"] for i in inference} == {"cpu"}
    assert max(i["batch_studies"] for i in inference) >= 2, inference
    # Two SRs and one SC per study in the PACS: batching mixed nobody's results.
    assert len(orthanc.instances()) == 12
    assert len(orthanc.studies()) == 4
