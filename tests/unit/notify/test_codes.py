"""The notify codes (service side) agree with the DICOM outputs' codes (worker side) for every label."""

from __future__ import annotations

from service.notify import codes
from worker.dicom.codes import FINDING_CODES, LOCAL_SCHEME_DESIGNATOR
from worker.labels import NIH_LABELS


def test_every_label_has_the_same_code_as_the_dicom_outputs() -> None:
    for label in NIH_LABELS:
        dicom = FINDING_CODES[label]
        ours = codes.FINDINGS[label]
        scheme = (
            codes.LOCAL if dicom.scheme_designator == LOCAL_SCHEME_DESIGNATOR else dicom.scheme_designator
        )
        assert (ours.system, ours.code) == (scheme, dicom.value), label
