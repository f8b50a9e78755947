"""A real PACS (Orthanc) routes a whole study to the listener: images in several syntaxes plus an SR."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from service.core.models import Instance
from service.core.settings import Source
from service.core.status import JobStatus
from tests.support.ingest import count, ingest_settings, instances, jobs, running_listener, wait_for
from tests.support.orthanc import OrthancError, OrthancServer

FILES = [
    "dicom/chest/cr-pa-mono1-explicit-le.dcm",
    "dicom/chest/cr-pa-mono1-j2k-lossless.dcm",
    "dicom/chest/sc-pa-jpeg-baseline.dcm",
    "dicom/sr/tid1500-example.dcm",
]


def _one_study(shared_dir: Path, out: Path) -> list[Path]:
    """The shared files rewritten into one study, as a PACS would hold them."""
    study = generate_uid()
    paths = []
    for n, name in enumerate(FILES):
        ds = dcmread(shared_dir / name)
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_pacs_routes_a_whole_study(tmp_path: Path, shared_dir: Path, orthanc: OrthancServer) -> None:
    files = _one_study(shared_dir, tmp_path)
    ids = [orthanc.upload(p)["ID"] for p in files]
    settings = ingest_settings(tmp_path / "gw", sources=[Source(ae_title=orthanc.aet, host="127.0.0.1")])
    with running_listener(settings) as listener:
        orthanc.add_modality("GATEWAY", settings.listener_ae_title, "127.0.0.1", settings.listener_port)
        assert orthanc.echo_modality("GATEWAY")
        answer = orthanc.store_to_modality("GATEWAY", ids)
        assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] == len(files)
        stored = instances(listener)
        assert len(stored) == len(files)
        assert {i.calling_ae_title for i in stored} == {orthanc.aet}
        assert len({i.study_id for i in stored}) == 1
        # Orthanc sends them as stored: compressed ones stay compressed.
        syntaxes = {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in files}
        assert {i.transfer_syntax_uid for i in stored} == syntaxes
        # One study, queued once the association is released (0.2 s grace). Orthanc re-associates to
        # propose another transfer syntax; on a loaded machine that can come after the grace, and then
        # the later instances' job waits behind the queued one (the study runs once more at the end,
        # never twice at once): one queued job, at most one waiting.
        wait_for(lambda: [j.status for j in jobs(listener)][:1] == [JobStatus.QUEUED])
        statuses = [j.status for j in jobs(listener)]
        assert statuses[0] == JobStatus.QUEUED and statuses[1:] in ([], [JobStatus.RECEIVED]), statuses

        # The PACS sends the study again (a re-route): nothing new.
        assert orthanc.store_to_modality("GATEWAY", ids)["FailedInstancesCount"] == 0
        assert count(listener, Instance) == len(files)


def test_pacs_not_on_the_list_is_refused(tmp_path: Path, shared_dir: Path, orthanc: OrthancServer) -> None:
    [path] = _one_study(shared_dir, tmp_path)[:1]
    instance = orthanc.upload(path)["ID"]
    settings = ingest_settings(tmp_path / "gw", sources=[Source(ae_title="OTHER_PACS", host="127.0.0.1")])
    with running_listener(settings) as listener:
        orthanc.add_modality("GATEWAY", settings.listener_ae_title, "127.0.0.1", settings.listener_port)
        assert not orthanc.echo_modality("GATEWAY")
        with pytest.raises(OrthancError):
            orthanc.store_to_modality("GATEWAY", [instance])
        assert count(listener, Instance) == 0
