"""DICOM Structured Reports for the AI results. Two reports per analysed image, one when nothing was.

Viewers choose how to show an SR by its document title (docs/sr-design.md): OHIF sends "Imaging
Measurement Report" (DCM 126000) to a measurement viewport that draws each Measurement Group's image
region and labels it with the group's NUM, and crashes on a group without a region; any other title
goes to a text viewport that prints the content tree. So:

Measurement report (`build_findings_sr`): Comprehensive 3D SR, TID 1500 "Imaging Measurement Report"::

    Language, observation context (device observer = the algorithm), Procedure reported = chest X-ray
    Image Library: the analysed source image
    Imaging Measurements (only when a finding is present and localised)
      one Planar ROI Measurement Group (TID 1410) per finding present at its operating point:
        Tracking Identifier "<finding> (AI)" / Tracking UID, Finding = <finding code>,
        Algorithm Identification (TID 4019): name, version, parameters bundle_hash=…, threshold=…
        Image Region = SCOORD closed POLYLINE on the source image (worker.regions), SELECTED FROM it
        NUM "<finding> score" (or "probability" for a calibrated bundle), the label a viewer shows
        <finding code> = Present   (qualitative evaluation at the operating point)
    Qualitative Evaluations
      CAD Processing and Findings Summary = All algorithms succeeded; with | without findings
      Comment = "AI-generated, not for diagnostic use. …", the operating points

Results report (`build_results_sr`): Comprehensive SR, TID 2000 "X-Ray Report" (LOINC 43468-8,
CID 7000), so that viewers print it as text: every finding's value, Present/Absent at its operating
point, the algorithm and the disclaimer.

"Not analysed" report (`build_not_analysed_sr`): the same TID 2000 shape, with a reason per received
instance.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import TypedDict

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageContentItem,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID

from worker.dicom.codes import (
    ABSENT,
    AI_DISCLAIMER,
    CHEST_XRAY_PROCEDURE,
    FINDING_CODES,
    IMPRESSION,
    LOCAL_CODING_SCHEME,
    OPERATING_POINT,
    PERCENT,
    PRESENT,
    PROCESSING_EQUIPMENT,
    SCORE_UNIT,
    XRAY_REPORT,
    display_name,
    finding_code,
    value_concept,
)
from worker.dicom.priority import priority_item
from worker.dicom.source import fill_empty_type2, require_analysed, source_header
from worker.dicom.uids import derive_uid
from worker.regions import Region

__all__ = [
    "AlgorithmInfo",
    "FindingResult",
    "OutputContext",
    "build_findings_sr",
    "build_not_analysed_sr",
    "build_results_sr",
    "contributing_equipment",
    "series_description",
    "source_header",
]

_LO_MAX = 64  # VR LO, e.g. Series Description
_UT_SAFE = 1024  # keep TEXT items short; UT allows far more but viewers truncate
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
    """One finding's output: NIH label, the model's value (a probability only when the bundle is
    calibrated) and the operating-point threshold."""

    label: str
    score: float
    threshold: float

    @property
    def present(self) -> bool:
        return self.score >= self.threshold


class ObjectIdentity(TypedDict):
    """The keywords every highdicom constructor takes for an object's place and its maker."""

    series_instance_uid: str
    series_number: int
    sop_instance_uid: str
    instance_number: int
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    contributing_equipment: list[hd.ContributingEquipment]


@dataclass(frozen=True, kw_only=True)
class OutputContext:
    """What every output object (SR, report, SC, GSPS) is built with besides its content: the algorithm
    that made it and where it stands in the study (its series, its own UID, their numbers). worker.outputs
    derives the UIDs; the source image is each builder's first argument (the not-analysed report has
    several)."""

    algorithm: AlgorithmInfo
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int = 1

    def identity(self) -> ObjectIdentity:
        """The keywords every highdicom constructor takes for the object's place and its maker."""
        algorithm = self.algorithm
        return {
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "sop_instance_uid": self.sop_instance_uid,
            "instance_number": self.instance_number,
            "manufacturer": algorithm.manufacturer,
            "manufacturer_model_name": algorithm.model_name,
            "software_versions": algorithm.software_version,
            "contributing_equipment": [contributing_equipment(algorithm)],
        }


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
    source: pydicom.Dataset,
    findings: Sequence[FindingResult],
    ctx: OutputContext,
    *,
    regions: Sequence[Region] = (),
    priority: str | None = None,
) -> pydicom.Dataset:
    """The measurement report for one analysed image: a localised group per present finding.

    ``regions`` lie on ``source``, one per label at most. A present finding without a region gets no
    group (a group without an image region breaks viewers); the results report still lists it.
    ``priority``: the worklist priority hint of the urgency rules that fired (worker.dicom.priority).
    """
    _check_findings(findings)
    by_label = _regions_by_label(findings, regions)
    (image,) = _evidence([source])
    require_analysed(image)
    rows, columns = _image_size(image)
    algorithm = ctx.algorithm
    groups = [
        _finding_group(
            finding,
            by_label[finding.label],
            algorithm,
            source=image,
            rows=rows,
            columns=columns,
            sop_instance_uid=ctx.sop_instance_uid,
        )
        for finding in findings
        if finding.present and finding.label in by_label
    ]
    content = _report_header(algorithm)
    content.append(
        CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=deepcopy(CHEST_XRAY_PROCEDURE),
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    content.append(_image_library([image]))
    if groups:
        content.append(_imaging_measurements(groups))
    summary = _findings_summary(findings, by_label, algorithm)
    if priority is not None:
        summary.ContentSequence.append(priority_item(priority))
    content.append(summary)
    root = ContainerContentItem(name=deepcopy(codes.cid7021.ImagingMeasurementReport), template_id="1500")
    root.ContentSequence = content
    description = series_description(f"{algorithm.name} findings")
    # local_codes: the value names are local codes.
    return _document(hd.sr.Comprehensive3DSR, [image], root, description, ctx, local_codes=True)


def _regions_by_label(findings: Sequence[FindingResult], regions: Sequence[Region]) -> dict[str, Region]:
    """The regions by their finding's label: one each at most, and only for findings reported."""
    by_label = {region.label: region for region in regions}
    if len(by_label) != len(regions):
        raise ValueError("each finding may have one region only")
    known = {finding.label for finding in findings}
    if set(by_label) - known:
        raise ValueError(f"regions for unknown findings: {sorted(set(by_label) - known)}")
    return by_label


def _imaging_measurements(
    groups: Sequence[PlanarROIMeasurementsAndQualitativeEvaluations],
) -> ContainerContentItem:
    measurements = ContainerContentItem(
        name=codes.DCM.ImagingMeasurements, relationship_type=RelationshipTypeValues.CONTAINS
    )
    measurements.ContentSequence = hd.sr.ContentSequence()
    for group in groups:
        measurements.ContentSequence.extend(group)
    return measurements


def _findings_summary(
    findings: Sequence[FindingResult], by_label: Mapping[str, Region], algorithm: AlgorithmInfo
) -> ContainerContentItem:
    """The CAD summary and its sentences: the disclaimer, what is present, what is not localised."""
    present = [finding for finding in findings if finding.present]
    summary = _ALL_SUCCEEDED_WITH_FINDINGS if present else _ALL_SUCCEEDED_WITHOUT_FINDINGS
    texts = [f"{AI_DISCLAIMER}. {algorithm.name} {algorithm.version} (bundle {algorithm.bundle_hash})."]
    texts.append(_present_sentence(present, algorithm))
    unlocalised = [finding.label for finding in present if finding.label not in by_label]
    if unlocalised:
        names = ", ".join(display_name(label) for label in unlocalised)
        texts.append(f"Present but not localised (no image region): {names}.")
    return _qualitative_evaluations(summary, texts)


def build_results_sr(
    source: pydicom.Dataset, findings: Sequence[FindingResult], ctx: OutputContext
) -> pydicom.Dataset:
    """The results report for one analysed image: every finding, readable as text in any viewer."""
    _check_findings(findings)
    (image,) = _evidence([source])
    algorithm = ctx.algorithm
    present = [finding for finding in findings if finding.present]
    impression = [
        _present_sentence(present, algorithm),
        f"{AI_DISCLAIMER}. {algorithm.name} {algorithm.version} (bundle {algorithm.bundle_hash}).",
    ]
    if not algorithm.calibrated:
        impression.append("Scores are model outputs in [0, 1], not calibrated probabilities.")
    rows = [_result_row(finding, algorithm) for finding in findings]
    root = _text_report(algorithm, impression=impression, findings=rows)
    description = series_description(f"{algorithm.name} results")
    return _document(hd.sr.ComprehensiveSR, [image], root, description, ctx, local_codes=True)


def _result_row(finding: FindingResult, algorithm: AlgorithmInfo) -> ContainerContentItem:
    # One SEPARATE container per finding with its items as siblings: text viewers print a container's
    # children but not a CODE item's own children (OHIF 3.13 showed "Atelectasis: Absent" and no value).
    row = ContainerContentItem(
        name=finding_code(finding.label),
        relationship_type=RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,
    )
    row.ContentSequence = hd.sr.ContentSequence(
        [
            CodeContentItem(
                name=finding_code(finding.label),
                value=deepcopy(PRESENT if finding.present else ABSENT),
                relationship_type=RelationshipTypeValues.CONTAINS,
            ),
            _value_item(finding, algorithm, RelationshipTypeValues.CONTAINS, for_reading=True),
            NumContentItem(
                name=deepcopy(OPERATING_POINT),
                value=_shown(finding.threshold, algorithm, for_reading=True),
                unit=deepcopy(_value_unit(algorithm)),
                relationship_type=RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    return row


def build_not_analysed_sr(
    sources: Sequence[pydicom.Dataset], reasons: Mapping[str, str], ctx: OutputContext
) -> pydicom.Dataset:
    """An SR saying the study was not analysed, with a reason per received instance.

    `sources` are the received instances (images or not; pixel data is not needed); `reasons` maps
    SOP Instance UID → reason text (e.g. a `ReasonCode` value). All sources appear in the Current
    Requested Procedure Evidence Sequence.
    """
    if not sources:
        raise ValueError("build_not_analysed_sr needs at least one received instance as evidence")
    evidence = _evidence(sources)
    known = {str(ds.SOPInstanceUID) for ds in evidence}
    notes: list[hd.sr.ContentItem] = []
    for uid, reason in sorted(reasons.items()):
        where = "" if uid in known else " (instance not in evidence)"
        notes.append(_comment(f"Not analysed: {reason}. SOP Instance UID {uid}{where}."))
    if not reasons:
        notes.append(_comment("Not analysed: no reason given."))
    algorithm = ctx.algorithm
    impression = [
        "Study not analysed: no image met the algorithm's input criteria.",
        f"{AI_DISCLAIMER}. {algorithm.name} {algorithm.version}.",
    ]
    root = _text_report(algorithm, impression=impression, findings=notes)
    description = series_description(f"{algorithm.name} not analysed")
    return _document(hd.sr.ComprehensiveSR, evidence, root, description, ctx, local_codes=False)


def _check_findings(findings: Sequence[FindingResult]) -> None:
    if not findings:
        raise ValueError("a report needs at least one finding")
    labels = [finding.label for finding in findings]
    unknown = sorted(set(labels) - FINDING_CODES.keys())
    if unknown:
        raise ValueError(f"unknown finding labels: {unknown}")
    if len(set(labels)) != len(labels):
        raise ValueError("each finding label may appear only once")
    for finding in findings:
        if not 0.0 <= finding.score <= 1.0 or not 0.0 <= finding.threshold <= 1.0:
            raise ValueError(f"{finding.label}: score and threshold must lie in [0, 1]")


def _present_sentence(present: Sequence[FindingResult], algorithm: AlgorithmInfo) -> str:
    if not present:
        return "No finding above its operating point."
    kind = "probability" if algorithm.calibrated else "score"
    parts = [
        f"{display_name(f.label)} ({kind} {f.score:.2f}, operating point {f.threshold:.2f})" for f in present
    ]
    return f"Above the operating point: {'; '.join(parts)}."


def _document(
    sr_class: type[hd.sr.ComprehensiveSR] | type[hd.sr.Comprehensive3DSR],
    evidence: Sequence[pydicom.Dataset],
    root: pydicom.Dataset,
    description: str,
    ctx: OutputContext,
    *,
    local_codes: bool,
) -> pydicom.Dataset:
    with warnings.catch_warnings():
        # Names are copied verbatim from the source; highdicom's advice on their form is log noise here.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        sr = sr_class(
            evidence=evidence,
            content=root,
            is_complete=True,
            is_final=False,  # unverified machine output: preliminary by definition
            is_verified=False,
            series_description=description,
            coding_schemes=[deepcopy(LOCAL_CODING_SCHEME)] if local_codes else None,
            **ctx.identity(),
        )
    return sr


def _report_header(algorithm: AlgorithmInfo) -> hd.sr.ContentSequence:
    content = hd.sr.ContentSequence()
    content.extend(LanguageOfContentItemAndDescendants(deepcopy(_LANGUAGE)))
    content.extend(_observation_context(algorithm))
    return content


def _text_report(
    algorithm: AlgorithmInfo, *, impression: Sequence[str], findings: Sequence[hd.sr.ContentItem]
) -> ContainerContentItem:
    """TID 2000 root: header, an Impressions section (text) and a Findings section."""
    content = _report_header(algorithm)
    for heading, items in (
        (codes.DCM.Impressions, [_comment(text, name=IMPRESSION) for text in impression]),
        (codes.DCM.Findings, list(findings)),
    ):
        section = ContainerContentItem(
            name=deepcopy(heading),
            relationship_type=RelationshipTypeValues.CONTAINS,
            is_content_continuous=False,
        )
        section.ContentSequence = hd.sr.ContentSequence(items)
        content.append(section)
    # SEPARATE: text viewers (OHIF) hide concept names inside CONTINUOUS containers.
    root = ContainerContentItem(name=deepcopy(XRAY_REPORT), template_id="2000", is_content_continuous=False)
    root.ContentSequence = content
    return root


def _comment(text: str, name: CodedConcept | None = None) -> TextContentItem:
    return TextContentItem(
        name=deepcopy(name or _COMMENT),
        value=_truncate(text, _UT_SAFE),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


def _value_unit(algorithm: AlgorithmInfo) -> CodedConcept:
    return PERCENT if algorithm.calibrated else SCORE_UNIT


def _shown(value: float, algorithm: AlgorithmInfo, *, for_reading: bool = False) -> float:
    """A value in [0, 1] as a report shows it: percent for probabilities, else as it is. Rounded so the
    DS value (16 characters at most) is exact and stable across platforms; ``for_reading``: to the digits
    a reader can use (text viewers print the stored value as it is)."""
    scaled = 100.0 * float(value) if algorithm.calibrated else float(value)
    if for_reading:
        return round(scaled, 1 if algorithm.calibrated else 3)
    return round(scaled, 6)


def _value_item(
    finding: FindingResult,
    algorithm: AlgorithmInfo,
    relationship: RelationshipTypeValues,
    *,
    for_reading: bool = False,
) -> NumContentItem:
    """The finding's value, named so a viewer's label reads as the finding ("Effusion score")."""
    return NumContentItem(
        name=value_concept(finding.label, algorithm.calibrated),
        value=_shown(finding.score, algorithm, for_reading=for_reading),
        unit=deepcopy(_value_unit(algorithm)),
        relationship_type=relationship,
    )


def _finding_group(
    finding: FindingResult,
    region: Region,
    algorithm: AlgorithmInfo,
    *,
    source: pydicom.Dataset,
    rows: int,
    columns: int,
    sop_instance_uid: str,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    code = finding_code(finding.label)
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        manufacturer=algorithm.manufacturer,
        parameters=[f"bundle_hash={algorithm.bundle_hash}", f"threshold={finding.threshold:.6g}"],
    )
    points = np.asarray(region.polygon, dtype=np.float64)
    # Belt and braces: a region is already clipped, but a viewer must never get a point off the image.
    points[:, 0] = np.clip(points[:, 0], 0.0, float(columns))
    points[:, 1] = np.clip(points[:, 1], 0.0, float(rows))
    image_region = ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=SourceImageForRegion.from_source_image(source),
    )
    value = _value_item(finding, algorithm, RelationshipTypeValues.CONTAINS)
    measurement = Measurement(
        name=value.ConceptNameCodeSequence[0],
        value=float(value.MeasuredValueSequence[0].NumericValue),
        unit=value.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0],
    )
    # "<finding> = Present" reads unambiguously; naming it "Finding" would repeat the group's Finding.
    evaluation = QualitativeEvaluation(name=deepcopy(code), value=deepcopy(PRESENT))
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid(PYDICOM_ROOT_UID, sop_instance_uid, "tracking", finding.label),
            identifier=f"{display_name(finding.label)} (AI)",
        ),
        referenced_region=image_region,
        finding_type=code,
        algorithm_id=algorithm_id,
        measurements=[measurement],
        qualitative_evaluations=[evaluation],
    )


def _image_size(ds: pydicom.Dataset) -> tuple[int, int]:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError("the analysed image lacks Rows/Columns") from exc
    if rows < 1 or columns < 1:
        raise ValueError("the analysed image has no pixels")
    return rows, columns


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
        if ds.get(keyword) is None:
            continue  # an invalid value was left out of the header (a not-analysed instance)
        items.append(
            NumContentItem(name=code, value=int(ds[keyword].value), unit=_PIXELS, relationship_type=context)
        )
    orientation = list(ds.get("PatientOrientation") or [])
    if len(orientation) == 2 and all(orientation):
        for name, direction in zip(
            (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn), orientation, strict=True
        ):
            items.append(TextContentItem(name=name, value=str(direction), relationship_type=context))
    spacing = [float(v) for v in ds.get("ImagerPixelSpacing") or []]
    if len(spacing) == 2 and min(spacing) > 0:  # zero spacing is a known real-world quirk: omit
        row_spacing, column_spacing = spacing
        for name, value in (
            (codes.DCM.HorizontalPixelSpacing, column_spacing),
            (codes.DCM.VerticalPixelSpacing, row_spacing),
        ):
            items.append(
                NumContentItem(name=name, value=value, unit=codes.UCUM.Millimeter, relationship_type=context)
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
    headers = [source_header(ds) for ds in sources]  # SourceHeaderError (a ValueError): invalid UID
    studies = {str(header.StudyInstanceUID) for header in headers}
    if len(studies) != 1:
        raise ValueError(f"sources must belong to exactly one study, got {len(studies)}")
    return [fill_empty_type2(header) for header in headers]


def _is_image(ds: pydicom.Dataset) -> bool:
    # The Image Pixel module's geometry is what marks an image; SR, KO, PR and the like lack it.
    return all(keyword in ds for keyword in ("Rows", "Columns", "SamplesPerPixel"))


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
