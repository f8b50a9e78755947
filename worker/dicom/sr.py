"""DICOM Structured Reports for the AI results: a TID 1500 Measurement Report in a Comprehensive 3D SR.

Findings report (`build_findings_sr`), following IHE AI Results (AIR)::

    Imaging Measurement Report (TID 1500)
      Language, observation context (device observer = the algorithm), Procedure reported = chest X-ray
      Image Library: the analysed source images
      Imaging Measurements
        one Measurement Group (TID 1501) per finding:
          Tracking Identifier / UID, Finding = <finding code>,
          Algorithm Identification (TID 4019): name, version, parameters bundle_hash=…, threshold=…
          Probability (DCM 122157) = p, unit UCUM "1"
          <finding code> = Present | Absent   (qualitative evaluation at the operating point)
      Qualitative Evaluations
        CAD Processing and Findings Summary = All algorithms succeeded; with | without findings
        Comment = "AI-generated, not for diagnostic use. …"

"Not analysed" report (`build_not_analysed_sr`): the same header without Imaging Measurements
(TID 1500 allows that when Qualitative Evaluations is present), summary "No algorithms succeeded;
without findings" and one Comment per instance saying why.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass

import highdicom as hd
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import config
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID
from pydicom.valuerep import validate_value

from worker.dicom.codes import (
    ABSENT,
    AI_DISCLAIMER,
    CHEST_XRAY_PROCEDURE,
    FINDING_CODES,
    LOCAL_CODING_SCHEME,
    LOCAL_SCHEME_DESIGNATOR,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    PROCESSING_EQUIPMENT,
    finding_code,
)
from worker.dicom.uids import derive_uid

__all__ = [
    "AlgorithmInfo",
    "FindingResult",
    "build_findings_sr",
    "build_not_analysed_sr",
    "contributing_equipment",
    "series_description",
    "source_header",
]

_LO_MAX = 64  # VR LO, e.g. Series Description
_UT_SAFE = 1024  # keep TEXT items short; UT allows far more but viewers truncate
_PIXEL_KEYWORDS = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})
# Type 3 attributes of the Patient Study module that our outputs copy from the source.
_DROPPABLE_IF_INVALID = frozenset({"PatientAge", "PatientSize", "PatientWeight"})
_EMPTY_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_CAD_SUMMARY = CodedConcept.from_code(codes.DCM.CADProcessingAndFindingsSummary)  # DCM 111017
_ALL_SUCCEEDED_WITH_FINDINGS = CodedConcept.from_code(codes.DCM.AllAlgorithmsSucceededWithFindings)
_ALL_SUCCEEDED_WITHOUT_FINDINGS = CodedConcept.from_code(codes.DCM.AllAlgorithmsSucceededWithoutFindings)
_NONE_SUCCEEDED = CodedConcept.from_code(codes.DCM.NoAlgorithmsSucceededWithoutFindings)
_PIXELS = CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="Pixels")
_MODALITY_CODES = {code.value: code for code in codes.cid33.concepts.values()}  # CID 33 Modality
_LANGUAGE = CodedConcept(value="en-US", scheme_designator="RFC5646", meaning="English (United States)")
_COMMENT = CodedConcept.from_code(codes.DCM.Comment)  # DCM 121106
# TID 1500 row "Qualitative Evaluations" container (not in pydicom's dictionary).
_QUALITATIVE_EVALUATIONS = CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)


@dataclass(frozen=True, kw_only=True)
class AlgorithmInfo:
    """Identity of the algorithm that produced the results (keywords only: many look-alike strings)."""

    name: str
    version: str
    bundle_hash: str
    software_version: str
    manufacturer: str = "cxr-gateway"
    model_name: str = "cxr-gateway DenseNet-121 CXR14"
    device_uid: str | None = None
    # Whether the bundle's outputs are calibrated probabilities; if not, they are called scores.
    calibrated: bool = False

    @property
    def observer_uid(self) -> str:
        """Device Observer UID: `device_uid`, else one derived from the algorithm's identity."""
        if self.device_uid:
            return self.device_uid
        return derive_uid(
            PYDICOM_ROOT_UID, "device", self.manufacturer, self.model_name, self.version, self.bundle_hash
        )


@dataclass(frozen=True)
class FindingResult:
    """One finding's output: NIH label, calibrated probability and the operating-point threshold."""

    label: str
    probability: float
    threshold: float

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


def series_description(kind: str) -> str:
    """'<kind> - AI-generated, not for diagnostic use', cut so the disclaimer always fits in 64 chars."""
    suffix = f" - {AI_DISCLAIMER}"
    return f"{kind[: _LO_MAX - len(suffix)]}{suffix}"


def contributing_equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    """Contributing Equipment item describing the algorithm (IHE AIR)."""
    item = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=deepcopy(PROCESSING_EQUIPMENT),
        manufacturer_model_name=algorithm.model_name,
        software_versions=algorithm.software_version,
        contribution_description=_truncate(
            f"AI inference: {algorithm.name} {algorithm.version}, bundle {algorithm.bundle_hash}",
            _LO_MAX * 16,
        ),
    )
    if algorithm.device_uid:
        item.DeviceUID = algorithm.device_uid
    return item


def build_findings_sr(
    sources: Sequence[pydicom.Dataset],
    findings: Sequence[FindingResult],
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
) -> pydicom.Dataset:
    """Build the findings SR for the analysed `sources` (images of one study) and their `findings`."""
    if not sources:
        raise ValueError("build_findings_sr needs at least one source image")
    if not findings:
        raise ValueError("build_findings_sr needs at least one finding")
    labels = [finding.label for finding in findings]
    unknown = sorted(set(labels) - FINDING_CODES.keys())
    if unknown:
        raise ValueError(f"unknown finding labels: {unknown}")
    if len(set(labels)) != len(labels):
        raise ValueError("each finding label may appear only once")
    for finding in findings:
        if not 0.0 <= finding.probability <= 1.0 or not 0.0 <= finding.threshold <= 1.0:
            raise ValueError(f"{finding.label}: probability and threshold must lie in [0, 1]")

    evidence = _evidence(sources)
    source_refs = [SourceImageForMeasurementGroup.from_source_image(ds) for ds in evidence]
    groups = [
        _finding_group(finding, algorithm, sop_instance_uid=sop_instance_uid, source_refs=source_refs)
        for finding in findings
    ]
    report = MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=deepcopy(CHEST_XRAY_PROCEDURE),
        imaging_measurements=groups,
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(deepcopy(_LANGUAGE)),
    )
    # Image Library (TID 1600) goes right after Procedure reported, before Imaging Measurements.
    root_items = report[0].ContentSequence
    root_items.insert(len(root_items) - 1, _image_library(evidence))
    any_present = any(finding.present for finding in findings)
    summary = _ALL_SUCCEEDED_WITH_FINDINGS if any_present else _ALL_SUCCEEDED_WITHOUT_FINDINGS
    operating = ", ".join(f"{f.label} {f.threshold:.4f}" for f in findings)
    report[0].ContentSequence.append(
        _qualitative_evaluations(
            summary,
            [
                f"{AI_DISCLAIMER}. {algorithm.name} {algorithm.version} (bundle {algorithm.bundle_hash}).",
                f"Present/Absent at the operating-point thresholds: {operating}.",
            ],
        )
    )
    uses_local_codes = any(
        FINDING_CODES[label].scheme_designator == LOCAL_SCHEME_DESIGNATOR for label in labels
    )
    return _document(
        evidence,
        report[0],
        algorithm,
        description=series_description(f"{algorithm.name} findings"),
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        local_codes=uses_local_codes,
    )


def build_not_analysed_sr(
    sources: Sequence[pydicom.Dataset],
    reasons: Mapping[str, str],
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
) -> pydicom.Dataset:
    """Build an SR saying the study was not analysed, with a reason per received instance.

    `sources` are the received instances (images or not; pixel data is not needed); `reasons` maps
    SOP Instance UID → reason text (e.g. a `ReasonCode` value). Image sources are listed in the Image
    Library; all sources appear in the Current Requested Procedure Evidence Sequence.
    """
    if not sources:
        raise ValueError("build_not_analysed_sr needs at least one received instance as evidence")
    evidence = _evidence(sources)
    images = [ds for ds in evidence if _is_image(ds)]

    root = ContainerContentItem(name=deepcopy(codes.cid7021.ImagingMeasurementReport), template_id="1500")
    content = hd.sr.ContentSequence()
    content.extend(LanguageOfContentItemAndDescendants(deepcopy(_LANGUAGE)))
    content.extend(_observation_context(algorithm))
    content.append(
        CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=deepcopy(CHEST_XRAY_PROCEDURE),
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    if images:
        content.append(_image_library(images))

    known = {str(ds.SOPInstanceUID) for ds in evidence}
    texts = [f"Study not analysed. {AI_DISCLAIMER}. {algorithm.name} {algorithm.version}."]
    for uid, reason in sorted(reasons.items()):
        where = "" if uid in known else " (instance not in evidence)"
        texts.append(f"Not analysed: {reason}. SOP Instance UID {uid}{where}.")
    if not reasons:
        texts.append("Not analysed: no reason given.")
    content.append(_qualitative_evaluations(_NONE_SUCCEEDED, texts))
    root.ContentSequence = content
    return _document(
        evidence,
        root,
        algorithm,
        description=series_description(f"{algorithm.name} not analysed"),
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        local_codes=False,
        is_complete=True,
    )


def _document(
    evidence: Sequence[pydicom.Dataset],
    root: pydicom.Dataset,
    algorithm: AlgorithmInfo,
    *,
    description: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    local_codes: bool,
    is_complete: bool = True,
) -> pydicom.Dataset:
    with warnings.catch_warnings():
        # Names are copied verbatim from the source; highdicom's advice on their form is log noise here.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        sr = Comprehensive3DSR(
            evidence=evidence,
            content=root,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=algorithm.manufacturer,
            is_complete=is_complete,
            is_final=False,  # unverified machine output: preliminary by definition
            is_verified=False,
            contributing_equipment=[contributing_equipment(algorithm)],
            series_description=description,
            manufacturer_model_name=algorithm.model_name,
            software_versions=algorithm.software_version,
            coding_schemes=[deepcopy(LOCAL_CODING_SCHEME)] if local_codes else None,
        )
    return sr


def _finding_group(
    finding: FindingResult,
    algorithm: AlgorithmInfo,
    *,
    sop_instance_uid: str,
    source_refs: Sequence[SourceImageForMeasurementGroup],
) -> MeasurementsAndQualitativeEvaluations:
    code = finding_code(finding.label)
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        manufacturer=algorithm.manufacturer,
        parameters=[f"bundle_hash={algorithm.bundle_hash}", f"threshold={finding.threshold:.6g}"],
    )
    probability = Measurement(
        name=deepcopy(PROBABILITY),
        # Rounded so the DS value (max 16 chars) is exact and stable across platforms.
        value=round(float(finding.probability), 6),
        unit=deepcopy(NO_UNITS),
    )
    # "<finding> = Present/Absent" reads unambiguously; naming it "Finding" would repeat the
    # group's Finding item with a different meaning.
    evaluation = QualitativeEvaluation(
        name=deepcopy(code), value=deepcopy(PRESENT if finding.present else ABSENT)
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid(PYDICOM_ROOT_UID, sop_instance_uid, "tracking", finding.label),
            identifier=finding.label,
        ),
        finding_type=code,
        algorithm_id=algorithm_id,
        measurements=[probability],
        qualitative_evaluations=[evaluation],
        source_images=[deepcopy(ref) for ref in source_refs],
    )


def _image_library(images: Sequence[pydicom.Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library with TID 1602/1603 descriptors taken only from what each header has.

    highdicom's ImageLibrary insists on Imager Pixel Spacing and Patient Orientation for projection
    radiographs; both are optional in CR and often absent (or zero), so the entries are built here.
    """
    group = ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence()
    for ds in images:
        entry = ImageContentItem(
            name=codes.SCT.Source,
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        entry.ContentSequence = hd.sr.ContentSequence(_image_descriptors(ds))
        group.ContentSequence.append(entry)
    library = ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _image_descriptors(ds: pydicom.Dataset) -> list[hd.sr.ContentItem]:
    context = RelationshipTypeValues.HAS_ACQ_CONTEXT
    items: list[hd.sr.ContentItem] = []
    modality = _MODALITY_CODES.get(str(ds.get("Modality", "")))
    if modality is not None:
        items.append(CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=context))
    for code, keyword in ((codes.DCM.PixelDataRows, "Rows"), (codes.DCM.PixelDataColumns, "Columns")):
        items.append(
            NumContentItem(name=code, value=int(ds[keyword].value), unit=_PIXELS, relationship_type=context)
        )
    orientation = list(ds.get("PatientOrientation") or [])
    if len(orientation) == 2 and all(orientation):
        items.append(
            TextContentItem(
                name=codes.DCM.PatientOrientationRow, value=str(orientation[0]), relationship_type=context
            )
        )
        items.append(
            TextContentItem(
                name=codes.DCM.PatientOrientationColumn, value=str(orientation[1]), relationship_type=context
            )
        )
    spacing = [float(v) for v in ds.get("ImagerPixelSpacing") or []]
    if len(spacing) == 2 and min(spacing) > 0:  # zero spacing is a known real-world quirk: omit
        row_spacing, column_spacing = spacing
        items.append(
            NumContentItem(
                name=codes.DCM.HorizontalPixelSpacing,
                value=column_spacing,
                unit=codes.UCUM.Millimeter,
                relationship_type=context,
            )
        )
        items.append(
            NumContentItem(
                name=codes.DCM.VerticalPixelSpacing,
                value=row_spacing,
                unit=codes.UCUM.Millimeter,
                relationship_type=context,
            )
        )
    return items


def _observation_context(algorithm: AlgorithmInfo) -> ObservationContext:
    device = DeviceObserverIdentifyingAttributes(
        uid=algorithm.observer_uid,
        name=_truncate(f"{algorithm.name} {algorithm.version}", _LO_MAX),
        manufacturer_name=algorithm.manufacturer,
        model_name=algorithm.model_name,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _qualitative_evaluations(summary: CodedConcept, texts: Sequence[str]) -> ContainerContentItem:
    container = ContainerContentItem(
        name=deepcopy(_QUALITATIVE_EVALUATIONS), relationship_type=RelationshipTypeValues.CONTAINS
    )
    items = hd.sr.ContentSequence()
    items.append(
        CodeContentItem(
            name=deepcopy(_CAD_SUMMARY),
            value=deepcopy(summary),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    for text in texts:
        items.append(
            TextContentItem(
                name=deepcopy(_COMMENT),
                value=_truncate(text, _UT_SAFE),
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    container.ContentSequence = items
    return container


def _evidence(sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Header copies of the sources, with empty Type 2 patient/study attributes where absent.

    highdicom reads these attributes unconditionally; received objects do not always carry them.
    """
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in sources}
    if len(studies) != 1 or "" in studies:
        raise ValueError(f"sources must belong to exactly one study, got {sorted(studies)}")
    copies: list[pydicom.Dataset] = []
    for ds in sources:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"source lacks {keyword}")
        header = source_header(ds)
        for keyword in _EMPTY_TYPE2:
            if keyword not in header:
                setattr(header, keyword, "")
        copies.append(header)
    return copies


def source_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of `ds` without pixel data, minus optional attributes whose values are invalid.

    Patient and study attributes are copied into our outputs; a malformed optional value in the
    source (e.g. Patient's Age "62" instead of "062Y") would otherwise make our objects invalid too.
    Guessing the intended value would be worse than leaving it out.
    """
    header = pydicom.Dataset()
    for element in ds:
        if element.keyword in _PIXEL_KEYWORDS:
            continue
        if element.keyword in _DROPPABLE_IF_INVALID and not _valid(element):
            continue
        header.add(deepcopy(element))
    return header


def _valid(element: pydicom.DataElement) -> bool:
    values = element.value if element.VM > 1 else [element.value]
    try:
        for value in values:
            validate_value(element.VR, value, config.RAISE)
    except ValueError:
        return False
    return True


def _is_image(ds: pydicom.Dataset) -> bool:
    # The Image Pixel module's geometry is what marks an image; SR, KO, PR and the like lack it.
    return all(keyword in ds for keyword in ("Rows", "Columns", "SamplesPerPixel"))


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
