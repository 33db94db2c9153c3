"""Series classification in the shared vocabulary: plane, phase and localizer, from headers only.

Every function takes a pydicom ``Dataset`` holding at least the header of one instance and returns
a value of the vocabulary in ``../shared/ARCHITECTURE.md``; ``unknown`` when the header does not
say, never a guess presented as fact.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Any, Sequence

from pydicom.dataset import Dataset


class Plane(str, enum.Enum):
    """Acquisition plane of a series, from the slice normal."""

    AXIAL = "axial"
    """Normal within ~37 degrees of the patient's head-foot axis."""
    CORONAL = "coronal"
    """Normal within ~37 degrees of the anterior-posterior axis."""
    SAGITTAL = "sagittal"
    """Normal within ~37 degrees of the left-right axis."""
    OBLIQUE = "oblique"
    """Normal far from every patient axis."""
    UNKNOWN = "unknown"
    """No usable Image Orientation (Patient)."""


class CTPhase(str, enum.Enum):
    """Contrast phase of a CT series."""

    NON_CONTRAST = "non_contrast"
    """No contrast given (contrast tags say none, or the description says so)."""
    ARTERIAL = "arterial"
    """Arterial phase (description, or under 45 s after bolus start)."""
    PORTAL_VENOUS = "portal_venous"
    """Portal venous phase (description, or 45 to 150 s after bolus start)."""
    DELAYED = "delayed"
    """Delayed phase (description, or over 150 s after bolus start)."""
    UNKNOWN = "unknown"
    """Not stated by the header."""


class MRPhase(str, enum.Enum):
    """Sequence family of an MR series (stored in the same ``phase`` column as CT phases)."""

    T1 = "t1"
    """T1-weighted."""
    T2 = "t2"
    """T2-weighted (not FLAIR)."""
    FLAIR = "flair"
    """Fluid-attenuated inversion recovery."""
    DWI = "dwi"
    """Diffusion-weighted (b > 0 or stated)."""
    ADC = "adc"
    """Apparent diffusion coefficient map."""
    OTHER = "other"
    """An MR series of another kind (EPI BOLD, angiography, ...)."""
    UNKNOWN = "unknown"
    """No sequence information."""


_AXIS_COS = 0.8  # |cos| of the angle between the normal and a patient axis; ~37 degrees


def _floats(value: Any, n: int) -> list[float] | None:
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return values


def _first_item(ds: Dataset, *path: str) -> Dataset | None:
    """Follow ``path`` of sequence keywords, taking the first item of each."""
    node: Any = ds
    for keyword in path:
        seq = node.get(keyword) if node is not None else None
        if not seq:
            return None
        node = seq[0]
    return node


def orientation(ds: Dataset) -> list[float] | None:
    """Image Orientation (Patient), from the top level or the enhanced functional groups."""
    value = ds.get("ImageOrientationPatient")
    if value is None:
        for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            item = _first_item(ds, group, "PlaneOrientationSequence")
            if item is not None and item.get("ImageOrientationPatient") is not None:
                value = item.ImageOrientationPatient
                break
    return _floats(value, 6) if value is not None else None


def slice_normal(ds: Dataset) -> list[float] | None:
    """Unit normal of the image plane (row direction x column direction), or ``None``."""
    iop = orientation(ds)
    if iop is None:
        return None
    r, c = iop[:3], iop[3:]
    n = [r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]]
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        return None
    return [v / norm for v in n]


def position_along_normal(ds: Dataset) -> float | None:
    """Image Position (Patient) projected on the slice normal, in mm."""
    normal = slice_normal(ds)
    value = ds.get("ImagePositionPatient")
    if value is None:
        item = _first_item(ds, "PerFrameFunctionalGroupsSequence", "PlanePositionSequence")
        value = item.get("ImagePositionPatient") if item is not None else None
    ipp = _floats(value, 3) if value is not None else None
    if normal is None or ipp is None:
        return None
    return sum(a * b for a, b in zip(ipp, normal))


def plane(ds: Dataset) -> Plane:
    """The acquisition plane from the slice normal (LPS: x left, y posterior, z head)."""
    normal = slice_normal(ds)
    if normal is None:
        return Plane.UNKNOWN
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) < _AXIS_COS:
        return Plane.OBLIQUE
    return (Plane.SAGITTAL, Plane.CORONAL, Plane.AXIAL)[axis]


def _text(ds: Dataset, *keywords: str) -> str:
    parts = []
    for keyword in keywords:
        value = ds.get(keyword)
        if value:
            parts.append(str(value))
    return " ".join(parts).lower()


def _has_word(text: str, words: Sequence[str]) -> bool:
    return any(re.search(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])", text) for w in words)


def image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType")
    if value is None:
        item = _first_item(ds, "SharedFunctionalGroupsSequence", "CTImageFrameTypeSequence") \
            or _first_item(ds, "SharedFunctionalGroupsSequence", "MRImageFrameTypeSequence")
        value = item.get("FrameType") if item is not None else None
    if value is None:
        return []
    if isinstance(value, str):
        return [value.upper()]
    return [str(v).upper() for v in value]


def is_localizer(ds: Dataset) -> bool:
    """A scout/localizer/survey image: never read by the model."""
    types = image_type(ds)
    if "LOCALIZER" in types:
        return True
    text = _text(ds, "SeriesDescription", "ProtocolName")
    return _has_word(text, ["localizer", "localiser", "scout", "topogram", "surview", "survey",
                            "scanogram", "3-plane loc", "3 plane loc", "tri-pilot", "pilot"])


def _seconds(value: Any) -> float | None:
    """DICOM TM (HHMMSS.FFFFFF, also with colons) as seconds since midnight."""
    if not value:
        return None
    text = str(value).replace(":", "").strip()
    try:
        hh, mm = int(text[0:2]), int(text[2:4] or 0)
        ss = float(text[4:] or 0)
    except ValueError:
        return None
    return hh * 3600 + mm * 60 + ss


def ct_phase(ds: Dataset) -> CTPhase:
    """CT contrast phase from the description, the contrast/bolus module and its timing.

    Order: explicit words in Series Description / Protocol Name / Contrast/Bolus Agent win; then
    the delay between Contrast/Bolus Start Time and Acquisition (or Series) Time; a Contrast/Bolus
    Agent that is present and names an agent without timing gives ``unknown``; an agent stated as
    none gives ``non_contrast``; no contrast information at all gives ``unknown``.
    """
    text = _text(ds, "SeriesDescription", "ProtocolName")
    if _has_word(text, ["non contrast", "non-contrast", "noncontrast", "without contrast",
                        "w/o contrast", "wo contrast", "nativ", "native", "plain", "nc", "unenhanced",
                        "pre contrast", "pre-contrast", "precontrast"]):
        return CTPhase.NON_CONTRAST
    if _has_word(text, ["arterial", "art", "cta", "angio", "angiography", "ctpa", "late arterial"]):
        return CTPhase.ARTERIAL
    if _has_word(text, ["portal", "venous", "pv", "portal venous", "portovenous", "ven"]):
        return CTPhase.PORTAL_VENOUS
    if _has_word(text, ["delayed", "delay", "late", "equilibrium", "excretory", "urographic"]):
        return CTPhase.DELAYED
    if "ContrastBolusAgent" not in ds and "ContrastBolusAgentSequence" not in ds:
        return CTPhase.UNKNOWN
    agent = _text(ds, "ContrastBolusAgent")
    if not agent.strip() and not ds.get("ContrastBolusAgentSequence"):
        return CTPhase.NON_CONTRAST if "ContrastBolusAgent" in ds else CTPhase.UNKNOWN
    if agent.strip() in ("none", "no", "n", "nil", "no contrast", "-"):
        return CTPhase.NON_CONTRAST
    start = _seconds(ds.get("ContrastBolusStartTime"))
    acquired = _seconds(ds.get("AcquisitionTime")) or _seconds(ds.get("SeriesTime"))
    if start is not None and acquired is not None:
        delay = (acquired - start) % 86400
        if delay < 45:
            return CTPhase.ARTERIAL
        if delay <= 150:
            return CTPhase.PORTAL_VENOUS
        return CTPhase.DELAYED
    return CTPhase.UNKNOWN


def _number(ds: Dataset, *keywords: str) -> float | None:
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            return float(value[0] if isinstance(value, (list, tuple)) else value)
        except (TypeError, ValueError, IndexError):
            continue
    return None


def mr_phase(ds: Dataset) -> MRPhase:
    """MR sequence family from image type, b-value, description, then TR/TE/TI."""
    types = image_type(ds)
    text = _text(ds, "SeriesDescription", "ProtocolName", "SequenceName")
    if "ADC" in types or _has_word(text, ["adc", "apparent diffusion", "dadc"]):
        return MRPhase.ADC
    bvalue = _number(ds, "DiffusionBValue")
    if bvalue is None:
        item = _first_item(ds, "SharedFunctionalGroupsSequence", "MRDiffusionSequence") \
            or _first_item(ds, "PerFrameFunctionalGroupsSequence", "MRDiffusionSequence")
        if item is not None:
            bvalue = _number(item, "DiffusionBValue")
    if (bvalue is not None and bvalue > 0) or "DIFFUSION" in types or "TRACEW" in types \
            or _has_word(text, ["dwi", "diffusion", "trace", "ep2d_diff", "resolve", "dti"]):
        return MRPhase.DWI
    if _has_word(text, ["flair", "tirm", "dark fluid", "darkfluid"]):
        return MRPhase.FLAIR
    if _has_word(text, ["t2", "t2w", "t2-weighted", "haste", "ssfse", "stir", "t2*", "swi"]):
        return MRPhase.T2
    if _has_word(text, ["t1", "t1w", "t1-weighted", "mprage", "vibe", "lava", "thrive", "spgr",
                        "flash", "dixon"]):
        return MRPhase.T1
    tr = _number(ds, "RepetitionTime")
    te = _number(ds, "EchoTime")
    ti = _number(ds, "InversionTime")
    if tr is None and te is None:
        return MRPhase.UNKNOWN
    if ti is not None and ti >= 1500 and te is not None and te >= 70:
        return MRPhase.FLAIR
    if tr is not None and te is not None:
        if tr <= 800 and te <= 30:
            return MRPhase.T1
        if tr >= 2000 and te >= 70:
            return MRPhase.T2
    return MRPhase.OTHER


def phase(ds: Dataset) -> str:
    """Phase in the shared vocabulary for the series' modality (``unknown`` for others)."""
    modality = str(ds.get("Modality", "")).upper()
    if modality == "CT":
        return ct_phase(ds).value
    if modality == "MR":
        return mr_phase(ds).value
    return "unknown"
