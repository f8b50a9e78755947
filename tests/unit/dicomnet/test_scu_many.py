"""A study's outputs to one peer over one association (service.dicomnet.scu.c_store_many), against a
real pynetdicom SCP that counts its associations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt

from service.core.errors import PermanentError, TransientError
from service.dicomnet.scu import c_store_many
from tests.support.net import free_port


class CountingPacs:
    def __init__(self, *sop_classes: str) -> None:
        self.associations = 0
        self.stored: list[str] = []
        ae = AE(ae_title="PACS")
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class)
        self.port = free_port()
        self.server: Any = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_ACCEPTED, self._accepted), (evt.EVT_C_STORE, self._store)],
        )

    def _accepted(self, _event: Any) -> None:
        self.associations += 1

    def _store(self, event: Any) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@pytest.fixture
def files(shared_dir: Path, tmp_path: Path) -> list[Path]:
    """Two CR objects and a Secondary Capture one, each its own instance."""
    out = []
    for n, sop_class in enumerate(
        [ComputedRadiographyImageStorage, ComputedRadiographyImageStorage, SecondaryCaptureImageStorage]
    ):
        ds = dcmread(shared_dir / "dicom" / "chest" / "cr-pa-mono1-explicit-le.dcm")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


@pytest.fixture
def started() -> Iterator[list[CountingPacs]]:
    pacs: list[CountingPacs] = []
    yield pacs
    for p in pacs:
        p.server.shutdown()


def _send(paths: list[Path], port: int) -> list[TransientError | PermanentError | None]:
    return c_store_many(paths, ae_title="PACS", host="127.0.0.1", port=port, calling_ae_title="GW", timeout=5)


def test_every_output_over_one_association(files: list[Path], started: list[CountingPacs]) -> None:
    pacs = CountingPacs(ComputedRadiographyImageStorage, SecondaryCaptureImageStorage)
    started.append(pacs)
    assert _send(files, pacs.port) == [None, None, None]
    assert pacs.associations == 1
    assert pacs.stored == [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def test_a_class_the_peer_refuses_fails_that_output_alone(
    files: list[Path], started: list[CountingPacs]
) -> None:
    pacs = CountingPacs(ComputedRadiographyImageStorage)
    started.append(pacs)
    first, second, sc = _send(files, pacs.port)
    assert (first, second) == (None, None)
    assert isinstance(sc, PermanentError) and sc.detail == "C-STORE status 0x0122"
    assert pacs.associations == 1 and len(pacs.stored) == 2


def test_a_peer_down_fails_every_output_as_transient(files: list[Path]) -> None:
    outcomes = _send(files, free_port())
    assert all(isinstance(o, TransientError) for o in outcomes) and len(outcomes) == 3
