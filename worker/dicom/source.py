"""The one place where attributes of a received instance are taken over into our outputs.

Every output builder (SR, SC, GSPS) starts from `source_header`: a new dataset holding only the
attributes listed in `COPIED`, each checked against its VR (PS3.5 6.2) and value multiplicity, then
normalised where the fix is certain (insignificant padding, a lower-case Code String, the retired
"YYYY.MM.DD" and "HH:MM:SS" forms, a Decimal String re-written to 16 characters) or left out where it is
not (a Patient's Age "62", an over-long Patient ID, a control character). Guessing a value would be worse
than leaving it out: the outputs are Type 2-empty there instead. Each fix or omission is logged with the
attribute's keyword and a reason code, never its value (it may be patient data).

The instance's identity (its SOP Class, SOP Instance, Study and Series UIDs) cannot be left out or fixed:
an invalid one raises `SourceHeaderError`, and no output refers to the instance.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any, Final

import pydicom
from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.multival import MultiValue
from pydicom.valuerep import format_number_as_ds

from service.core.status import ReasonCode

__all__ = [
    "ANALYSED",
    "COPIED",
    "IDENTITY",
    "SourceHeaderError",
    "clean_element",
    "fill_empty_type2",
    "require_analysed",
    "source_header",
]

log = logging.getLogger(__name__)

# The instance's identity: Type 1 wherever our outputs reference it.
IDENTITY: Final = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# What an analysed image's outputs (the findings SR, the SC, the GSPS) cannot do without: an image
# whose values here are invalid was never decoded or passed the gate, so only a "not analysed" report
# can refer to it.
ANALYSED: Final = ("Rows", "Columns", "Modality")

# Every attribute an output takes from its source, directly or through highdicom (which copies the
# Patient and Study modules of whatever header it is given).
COPIED: Final = (
    *IDENTITY,
    "SpecificCharacterSet",
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    # General Study, Patient Study
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    # Series and image: anatomy, geometry, rendering
    "Modality",
    "BodyPartExamined",
    "Laterality",
    "ImageLaterality",
    "ViewPosition",
    "PatientOrientation",
    "AnatomicalOrientationType",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "BitsStored",
    "LossyImageCompression",
    "LossyImageCompressionMethod",
    "LossyImageCompressionRatio",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
    "ModalityLUTSequence",
)

# Enumerated values (PS3.3): any other value, however well formed, is invalid.
_ENUMERATED: Final = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "Laterality": frozenset({"R", "L"}),
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),
    "AnatomicalOrientationType": frozenset({"BIPED", "QUADRUPED"}),
    "LossyImageCompression": frozenset({"00", "01"}),
    "VOILUTFunction": frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"}),
    "PhotometricInterpretation": frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR"}),
    "PatientOrientation": frozenset(
        {"".join(p) for p in itertools.product("APRLHF", repeat=1)}
        | {a + b for a in "APRLHF" for b in "APRLHF" if a != b}
        | {a + b + c for a in "APRLHF" for b in "APRLHF" for c in "APRLHF" if len({a, b, c}) == 3}
    ),
}

# Attributes that outputs carry as Type 2 (empty when unknown): an empty source value is kept. Any other
# empty value is left out, absent being what highdicom and the IODs expect of an unknown Type 3 or 1C.
_EMPTY_ALLOWED: Final = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "Laterality",
        "PatientOrientation",
    }
)
# Attributes that are only meaningful together: when one of them is left out, so is the other.
_PAIRS: Final = (("RescaleSlope", "RescaleIntercept"), ("WindowCenter", "WindowWidth"))

# PS3.5 Table 6.2-1: maximum characters per value (PN: per component group).
_MAX_CHARS: Final = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
}
_TEXT_VRS: Final = frozenset({"LT", "ST", "UT"})  # may hold CR, LF, FF, TAB and backslashes
_BINARY_VRS: Final = frozenset({"US", "SS", "UL", "SL", "FL", "FD"})
_CS_CHARS = re.compile(r"[A-Z0-9 _]*")
_AS_FORM = re.compile(r"\d{3}[DWMY]")
_DA_FORM = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TM_FORM = re.compile(r"(\d{2})((\d{2})((\d{2})(\.\d{1,6})?)?)?")
_DS_FORM = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_IS_FORM = re.compile(r"[+-]?\d+")
_UID_FORM = re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*")
_ESC = "\x1b"

# A cleaner takes one value and gives it back (possibly fixed), or raises _Invalid.
_Cleaner = Callable[[Any, "_Context"], Any]


class SourceHeaderError(ValueError):
    """The source's identity is invalid: no output can reference it. ``reason`` is a ReasonCode."""

    def __init__(self, reason: ReasonCode, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


class _Invalid(Exception):
    pass


class _Context:
    def __init__(self, encodings: list[str] | None) -> None:
        # None: the default repertoire (ASCII). ISO 2022 code extensions allow ESC.
        self.encodings = encodings
        self.fixed = False


def source_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A new dataset with the attributes of `ds` that outputs copy (`COPIED`), each valid for its VR.

    Raises SourceHeaderError when one of `IDENTITY` is missing or invalid.
    """
    header = pydicom.Dataset()
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        syntax = str(file_meta.TransferSyntaxUID).strip("\x00 ")
        if _UID_FORM.fullmatch(syntax) and len(syntax) <= 64:
            header.file_meta = pydicom.dataset.FileMetaDataset()
            header.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    context = _Context(_encodings(ds))
    for keyword in COPIED:
        try:
            element = ds[keyword] if keyword in ds else None  # noqa: SIM401 (the element, not its value)
        except Exception:  # a value pydicom cannot even convert
            element = None
            _note(keyword, ReasonCode.SOURCE_ATTRIBUTE_DROPPED)
            if keyword in IDENTITY:
                raise SourceHeaderError(ReasonCode.INVALID_UIDS, f"{keyword} is unreadable") from None
            continue
        if element is None or (keyword in IDENTITY and element.value in (None, "")):
            if keyword in IDENTITY:
                raise SourceHeaderError(ReasonCode.MISSING_UIDS, f"source lacks {keyword}")
            continue
        cleaned = clean_element(element, context)
        if cleaned is None:
            if keyword in IDENTITY:
                raise SourceHeaderError(ReasonCode.INVALID_UIDS, f"{keyword} is not a valid UID")
            continue
        header.add(cleaned)
    for pair in _PAIRS:
        present = [keyword for keyword in pair if keyword in header]
        if len(present) == 1:
            del header[present[0]]
            _note(present[0], ReasonCode.SOURCE_ATTRIBUTE_DROPPED)
    if context.encodings is None and "SpecificCharacterSet" in header:
        del header.SpecificCharacterSet  # it named no character set we know: the default applies
        _note("SpecificCharacterSet", ReasonCode.SOURCE_ATTRIBUTE_DROPPED)
    return header


# Patient/study attributes highdicom reads unconditionally (Type 2 in every output); received objects do not
# always carry them, and an invalid one was left out of the header.
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


def fill_empty_type2(header: pydicom.Dataset) -> pydicom.Dataset:
    """``header`` with the Type 2 patient/study attributes it lacks, empty (as DICOM says: unknown)."""
    for keyword in _EMPTY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def require_analysed(header: pydicom.Dataset) -> None:
    """Raise SourceHeaderError unless the checked `header` has what an analysed image's outputs need."""
    missing = [keyword for keyword in ANALYSED if header.get(keyword) in (None, "")]
    if missing:
        raise SourceHeaderError(
            ReasonCode.SOURCE_ATTRIBUTE_DROPPED, f"source lacks {', '.join(missing)} (or it was invalid)"
        )


def clean_element(
    element: pydicom.DataElement, character_set: str | Sequence[str] | _Context | None = None
) -> pydicom.DataElement | None:
    """A valid copy of `element` (normalised where needed), or None when its value cannot be kept.

    ``character_set``: the Specific Character Set its text is in (default: the default repertoire).
    """
    if isinstance(character_set, _Context):
        context = character_set
    else:
        holder = pydicom.Dataset()
        if character_set:
            holder.SpecificCharacterSet = character_set
        context = _Context(_encodings(holder))
    keyword = element.keyword
    vr = dictionary_VR(element.tag) if element.VR in ("UN", None) else element.VR
    if vr == "SQ":
        value = _clean_lut_sequence(element.value, keyword) if keyword.endswith("LUTSequence") else None
        if value is None:
            _note(keyword, ReasonCode.SOURCE_ATTRIBUTE_DROPPED)
            return None
        return pydicom.DataElement(element.tag, "SQ", value)
    raw = element.value
    values = list(raw) if isinstance(raw, MultiValue | list | tuple) else [raw]
    if raw is None or raw == "" or values == []:
        if keyword in _EMPTY_ALLOWED:
            return pydicom.DataElement(element.tag, vr, None if vr in _BINARY_VRS else "")
        _note(keyword, ReasonCode.SOURCE_ATTRIBUTE_DROPPED)
        return None
    context.fixed = False
    try:
        cleaned = [_CLEANERS.get(vr, _keep)(value, context) for value in values]
        if not _vm_ok(element.tag, len(cleaned)):
            raise _Invalid
        allowed = _ENUMERATED.get(keyword)
        if allowed is not None and any(value not in allowed for value in cleaned):
            raise _Invalid
    except _Invalid:
        _note(keyword, ReasonCode.SOURCE_ATTRIBUTE_DROPPED)
        return None
    if context.fixed:
        _note(keyword, ReasonCode.SOURCE_ATTRIBUTE_NORMALISED)
    return pydicom.DataElement(element.tag, vr, cleaned if len(cleaned) > 1 else cleaned[0])


def _note(keyword: str, reason: ReasonCode) -> None:
    log.info("source attribute %s keyword=%s", reason, keyword)


def _encodings(ds: pydicom.Dataset) -> list[str] | None:
    try:
        value = ds.get("SpecificCharacterSet")
    except Exception:
        return None
    if not value:
        return None
    terms = [str(v).strip() for v in (value if isinstance(value, MultiValue | list) else [value])]
    # pydicom falls back to the default repertoire for a term it does not know; we leave the set out.
    if any(term and term not in python_encoding for term in terms):
        return None
    try:
        return list(convert_encodings(terms))
    except Exception:
        return None


def _vm_ok(tag: Any, count: int) -> bool:
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return True
    if vm.isdigit():
        return count == int(vm)
    low = vm.split("-")[0]
    return count >= int(low) if low.isdigit() else True


# ---------------------------------------------------------------------------------------------- per VR


def _keep(value: Any, context: _Context) -> Any:
    return value


def _chars_ok(text: str, vr: str, context: _Context) -> bool:
    """PS3.5 6.1: the default repertoire is printable ASCII; text VRs add CR, LF, FF and TAB; code
    extensions (ESC) only under a Specific Character Set; the value must encode in that set."""
    allowed_controls = "\r\n\f\t" if vr in _TEXT_VRS else ""
    for char in text:
        if char < " " or char == "\x7f":
            if char in allowed_controls or (char == _ESC and context.encodings):
                continue
            return False
        if char > "\x7e" and context.encodings is None:
            return False
        if char == "\\" and vr not in _TEXT_VRS:
            return False
    if context.encodings is not None:
        try:
            pydicom.charset.encode_string(text, context.encodings)
        except Exception:
            return False
    return True


def _string(value: Any, vr: str, context: _Context) -> str:
    text = value if isinstance(value, str) else str(value)
    stripped = text.strip(" ") if vr not in _TEXT_VRS else text.rstrip(" ")
    if vr in ("LO", "SH", "PN", "LT", "ST", "UT"):
        stripped = stripped.strip("\x00")
    if not _chars_ok(stripped, vr, context):
        raise _Invalid
    limit = _MAX_CHARS.get(vr)
    if limit is not None and vr != "PN" and len(stripped) > limit:
        raise _Invalid
    return stripped


def _clean_cs(value: Any, context: _Context) -> str:
    text = str(value).strip(" ")
    upper = text.upper()
    if upper != text:
        context.fixed = True
    if len(upper) > _MAX_CHARS["CS"] or not _CS_CHARS.fullmatch(upper):
        raise _Invalid
    return upper


def _clean_da(value: Any, context: _Context) -> str:
    text = str(value).strip(" ")
    if len(text) == 10 and text[4] == text[7] == ".":  # ACR-NEMA "YYYY.MM.DD" (PS3.5 6.2, retired)
        text = text.replace(".", "")
        context.fixed = True
    match = _DA_FORM.fullmatch(text)
    if not match:
        raise _Invalid
    try:
        date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise _Invalid from None
    return text


def _clean_tm(value: Any, context: _Context) -> str:
    text = str(value).strip(" ")
    if ":" in text:  # ACR-NEMA "HH:MM:SS" (retired)
        text = text.replace(":", "")
        context.fixed = True
    match = _TM_FORM.fullmatch(text)
    if not match or len(text) > _MAX_CHARS["TM"]:
        raise _Invalid
    hours, minutes, seconds = int(match[1]), int(match[3] or 0), int(match[5] or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        raise _Invalid
    return text


def _clean_as(value: Any, context: _Context) -> str:
    text = str(value).strip(" ")
    if not _AS_FORM.fullmatch(text):
        raise _Invalid
    return text


def _clean_ds(value: Any, context: _Context) -> str:
    text = str(getattr(value, "original_string", None) or value).strip(" ")
    try:
        number = float(text)
    except ValueError:
        raise _Invalid from None
    if not math.isfinite(number):
        raise _Invalid
    if _DS_FORM.fullmatch(text) and len(text) <= _MAX_CHARS["DS"]:
        return text
    context.fixed = True
    return str(format_number_as_ds(number))


def _clean_is(value: Any, context: _Context) -> str:
    text = str(getattr(value, "original_string", None) or value).strip(" ")
    if not _IS_FORM.fullmatch(text):
        try:
            number = float(text)
        except ValueError:
            raise _Invalid from None
        if not number.is_integer():
            raise _Invalid
        text = str(int(number))
        context.fixed = True
    if not -(2**31) <= int(text) < 2**31 or len(text) > _MAX_CHARS["IS"]:
        raise _Invalid
    return text


def _clean_ui(value: Any, context: _Context) -> str:
    text = str(value).strip("\x00 ")
    if len(text) > _MAX_CHARS["UI"] or not _UID_FORM.fullmatch(text):
        raise _Invalid
    return text


def _clean_pn(value: Any, context: _Context) -> str:
    text = _string(value, "PN", context)
    groups = text.split("=")
    if len(groups) > 3:
        raise _Invalid
    for group in groups:
        if len(group) > _MAX_CHARS["PN"] or len(group.split("^")) > 5:
            raise _Invalid
    return text


def _clean_number(value: Any, context: _Context) -> Any:
    if isinstance(value, bytes | bytearray) or not math.isfinite(float(value)):
        raise _Invalid
    return value


def _text_cleaner(vr: str) -> _Cleaner:
    return lambda value, context: _string(value, vr, context)


_CLEANERS: dict[str, _Cleaner] = {
    "CS": _clean_cs,
    "DA": _clean_da,
    "TM": _clean_tm,
    "AS": _clean_as,
    "DS": _clean_ds,
    "IS": _clean_is,
    "UI": _clean_ui,
    "PN": _clean_pn,
    **{vr: _text_cleaner(vr) for vr in ("AE", "LO", "SH", "LT", "ST", "UT")},
    **{vr: _clean_number for vr in ("US", "SS", "UL", "SL", "FL", "FD")},
}


def _clean_lut_sequence(items: Any, keyword: str) -> pydicom.Sequence | None:
    """A LUT sequence (one item of LUT Descriptor and LUT Data, PS3.3 C.11.1/C.11.2), or None."""
    if not isinstance(items, pydicom.Sequence) or not 1 <= len(items) <= (1 if "Modality" in keyword else 16):
        return None
    clean = pydicom.Sequence()
    for item in items:
        try:
            descriptor = [int(v) for v in item.LUTDescriptor]
            data = item["LUTData"]
        except Exception:
            return None
        if len(descriptor) != 3 or descriptor[2] not in (8, 10, 11, 12, 13, 14, 15, 16):
            return None
        entries = descriptor[0] or 65536
        values = data.value
        count = len(values) // 2 if isinstance(values, bytes | bytearray) else len(list(values))
        if count != entries:
            return None
        copy = pydicom.Dataset()
        copy.LUTDescriptor = descriptor
        copy.add(pydicom.DataElement(data.tag, data.VR, values))
        for extra in ("LUTExplanation", "ModalityLUTType"):
            if extra in item:
                cleaned = clean_element(item[extra])
                if cleaned is not None:
                    copy.add(cleaned)
        clean.append(copy)
    return clean
