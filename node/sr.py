"""The draft report as a DICOM Comprehensive SR (TID 2000), built with highdicom.

Root container "Diagnostic Imaging Report" (18748-4, LN, template 2000) holding the language, a
device observer context (the node's device UID, name = model name, model name = model version),
Findings (121070) with the Finding text (121071), Impressions (121072) with the Impression text
(121073), and a procedure description saying which series were read. Flags: CompletionFlag
PARTIAL, VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY; the series description says it
is an unverified AI draft; Contributing Equipment names the algorithm and its version (IHE AI
Results); the evidence references every instance that was read; a re-report references the
earlier SR (Predecessor Documents); the patient's Specific Character Set is kept where it can
write every text of the document, else the document is written in UTF-8 (ISO_IR 192), so a
draft never loses a character to a replacement mark.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

import highdicom as hd
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node import __version__

SERIES_DESCRIPTION = "AI DRAFT - UNVERIFIED"
MANUFACTURER = "msvlm-node"


FINDING_CODES: dict[str, hd.sr.CodedConcept] = {
    label: hd.sr.CodedConcept(value, scheme, meaning) for label, (value, scheme, meaning) in {
        "Medical material": ("52124006", "SCT", "Central venous catheter"),
        "Arterial wall calcification": ("54160000", "SCT", "Atherosclerosis of aorta"),
        "Cardiomegaly": ("287272002", "SCT", "Cardiomegaly"),
        "Pericardial effusion": ("373945007", "SCT", "Pericardial effusion"),
        "Coronary artery wall calcification": ("53741008", "SCT",
                                               "Coronary arteriosclerosis"),
        "Hiatal hernia": ("84089009", "SCT", "Hiatal hernia"),
        "Lymphadenopathy": ("30746006", "SCT", "Lymphadenopathy"),
        "Emphysema": ("87433001", "SCT", "Pulmonary emphysema"),
        "Atelectasis": ("46621007", "SCT", "Atelectasis"),
        "Lung nodule": ("786838002", "SCT", "Pulmonary nodule"),
        "Lung opacity": ("112120", "DCM", "Ground glass opacity"),
        "Pulmonary fibrotic sequela": ("51615001", "SCT", "Fibrosis of lung"),
        "Pleural effusion": ("60046008", "SCT", "Pleural effusion"),
        "Mosaic attenuation pattern": ("112130", "DCM", "Mosaic pattern"),
        "Peribronchial thickening": ("PERIBRONCHIAL", "99MSVLM", "Peribronchial thickening"),
        "Consolidation": ("95436008", "SCT", "Lung consolidation"),
        "Bronchiectasis": ("12295008", "SCT", "Bronchiectasis"),
        "Interlobular septal thickening": ("112114", "DCM", "Septal line(s)"),
        "Pulmonary embolism": ("59282003", "SCT", "Pulmonary embolism"),
    }.items()}
"""The coded concept of each label (SNOMED CT where one fits; DICOM's thoracic findings, CID
6102, otherwise; one private code, scheme 99MSVLM, where neither has the concept)."""
LATERALITY = hd.sr.CodedConcept("272741003", "SCT", "Laterality")
SIDES = {"right": hd.sr.CodedConcept("24028007", "SCT", "Right"),
         "left": hd.sr.CodedConcept("7771000", "SCT", "Left")}


@dataclass(frozen=True)
class KeyImage:
    """One key slice: the header of the instance that holds it and, for a multi-frame image,
    the frame number (1-based)."""

    dataset: Dataset
    frame: int | None = None


@dataclass(frozen=True)
class CodedFinding:
    """One positive finding of the model: its label, probability, stated laterality and key
    slices."""

    label: str
    probability: float
    laterality: str | None = None
    key_images: tuple[KeyImage, ...] = ()


def _device(device_uid: str, model_name: str, model_version: str) -> hd.sr.ObserverContext:
    """The device observer (TID 1004): the node's device UID, name = model name, model name =
    model version."""
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=model_name[:64], manufacturer_name=MANUFACTURER,
            model_name=model_version))


def _with_type2(ds: Dataset) -> Dataset:
    """A copy of the first evidence header with the type 2 patient/study attributes highdicom
    copies present (empty where the images lack them)."""
    first = copy.deepcopy(ds)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
                    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in first:
            setattr(first, keyword, "")
    return first


_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})


def _keep_character_set(document: Dataset, evidence: Dataset) -> None:
    """Write ``document`` in the evidence's Specific Character Set where that set can encode
    every text in it: names copied from the evidence then keep the bytes they came in. Where it
    cannot (a draft or a label outside the patient's repertoire, say Latin-1 against an arrow or
    a Greek letter), the document is written in UTF-8 (ISO_IR 192), which holds both."""
    charset = evidence.get("SpecificCharacterSet")
    chars = {char for element in document.iterall() if element.VR in _TEXT_VRS
             for value in (element.value if element.VM > 1 else [element.value]) if value
             for char in str(value) if not char.isascii()}
    encodings = convert_encodings(charset) if charset else []

    def encodable(char: str) -> bool:
        for encoding in encodings:
            try:
                char.encode(encoding)
                return True
            except (UnicodeError, LookupError):
                continue
        return False

    if charset and all(encodable(char) for char in chars):
        document.SpecificCharacterSet = charset
    elif chars:
        document.SpecificCharacterSet = "ISO_IR 192"


def _coded_finding(finding: CodedFinding) -> hd.sr.CodeContentItem:
    """CODE (Finding = concept), laterality, probability and IMAGE items for its key slices."""
    concept = FINDING_CODES.get(finding.label) or hd.sr.CodedConcept(
        finding.label.upper().replace(" ", "_")[:16], "99MSVLM", finding.label)
    item = hd.sr.CodeContentItem(name=codes.DCM.Finding, value=concept,
                                 relationship_type="CONTAINS")
    children: list[Dataset] = []
    if finding.laterality in SIDES:
        children.append(hd.sr.CodeContentItem(name=LATERALITY, value=SIDES[finding.laterality],
                                              relationship_type="HAS CONCEPT MOD"))
    children.append(hd.sr.NumContentItem(
        name=codes.DCM.Probability, value=round(float(finding.probability), 4),
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"), relationship_type="HAS PROPERTIES"))
    for key in finding.key_images:
        children.append(hd.sr.ImageContentItem(
            name=codes.DCM.SourceImage,
            referenced_sop_class_uid=key.dataset.SOPClassUID,
            referenced_sop_instance_uid=key.dataset.SOPInstanceUID,
            referenced_frame_numbers=[key.frame] if key.frame else None,
            relationship_type="INFERRED FROM"))
    item.ContentSequence = children  # type: ignore[assignment]
    return item


@dataclass(frozen=True)
class SeriesRead:
    """One series the model read (for the statement in the report)."""

    series_instance_uid: str
    series_number: int | None
    description: str
    plane: str
    phase: str
    images: int


def statement(series: Sequence[SeriesRead], not_assessed: Sequence[str] = ()) -> str:
    parts = [f"series {s.series_number if s.series_number is not None else '?'}"
             f" ({s.description or 'no description'}; {s.plane}, {s.phase.replace('_', ' ')}, "
             f"{s.images} images)" for s in series]
    blind = (f" Not assessed by this model (never reported, whatever the images show): "
             f"{', '.join(label.lower() for label in not_assessed)}." if not_assessed else "")
    return ("Draft written by an AI model from " + "; ".join(parts) + "." + blind +
            " Unverified: to be reviewed and verified by a radiologist.")


def build_report_sr(findings: str, impression: str, model_name: str, model_version: str,
                    device_uid: str, evidence: Sequence[Dataset], series_read: Sequence[SeriesRead],
                    previous: Sequence[Dataset] = (), series_number: int = 9901,
                    series_instance_uid: str | None = None,
                    coded: Sequence[CodedFinding] = (),
                    not_assessed: Sequence[str] = ()) -> Dataset:
    """Build the SR; ``evidence`` are the headers of every instance that was read; ``coded``
    the positive findings of the model's head, each a CODE item under Findings.

    Raises
    ------
    ValueError
        No evidence, or evidence from several studies.
    """
    if not evidence:
        raise ValueError("Invalid 'evidence' - the SR must reference the instances read")
    studies = {str(ds.StudyInstanceUID) for ds in evidence}
    if len(studies) != 1:
        raise ValueError(f"Invalid 'evidence' - instances of {len(studies)} studies")
    device = _device(device_uid, model_name, model_version)
    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report"),
        template_id="2000")
    findings_item = hd.sr.ContainerContentItem(name=codes.DCM.Findings,
                                               relationship_type="CONTAINS")
    findings_item.ContentSequence = [hd.sr.TextContentItem(  # type: ignore[assignment]
        name=codes.DCM.Finding, value=findings or "(none)", relationship_type="CONTAINS"),
        *(_coded_finding(f) for f in coded)]
    impressions = hd.sr.ContainerContentItem(name=codes.DCM.Impressions,
                                             relationship_type="CONTAINS")
    impressions.ContentSequence = [hd.sr.TextContentItem(  # type: ignore[assignment]
        name=codes.DCM.Impression, value=impression or "(none)", relationship_type="CONTAINS")]
    procedure = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("121064", "DCM", "Current Procedure Descriptions"),
        relationship_type="CONTAINS")
    procedure.ContentSequence = [hd.sr.TextContentItem(  # type: ignore[assignment]
        name=hd.sr.CodedConcept("121065", "DCM", "Procedure Description"),
        value=statement(series_read, not_assessed), relationship_type="CONTAINS")]
    language = hd.sr.LanguageOfContentItemAndDescendants(
        language=hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)"))
    context = hd.sr.ObservationContext(observer_device_context=device)
    root.ContentSequence = [*language, *context, procedure, findings_item,  # type: ignore
                            impressions]
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=hd.sr.CodedConcept("109103", "DCM", "Processing Algorithm"),
        manufacturer_model_name=model_name[:64],
        software_versions=[model_version, f"msvlm-node {__version__}"],
        contribution_datetime=datetime.now(),
        contribution_description="Draft report written by an AI model (unverified)")
    # highdicom refuses some valid multi-valued character sets (ISO 2022 with an empty first
    # value); it builds the SR in UTF-8 and the patient's own set is put back afterwards where it
    # can write every text (_keep_character_set).
    first = _with_type2(evidence[0])
    sr = hd.sr.ComprehensiveSR(
        evidence=[first, *evidence[1:]], content=root, specific_character_set="ISO_IR 192",
        series_instance_uid=series_instance_uid or generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=False, is_final=False, is_verified=False,
        previous_versions=list(previous) or None, contributing_equipment=[equipment])
    sr.SeriesDescription = f"{SERIES_DESCRIPTION} ({model_name})"[:64]
    sr.PreliminaryFlag = "PRELIMINARY"
    _keep_character_set(sr, evidence[0])
    return sr


def build_key_images(coded: Sequence[CodedFinding], model_name: str, model_version: str,
                     device_uid: str, series_number: int = 9902) -> Dataset | None:
    """A Key Object Selection document ("Of Interest") referencing the key slices of every
    positive finding, so viewers that show key images open them directly; None without any."""
    seen: dict[str, Dataset] = {}
    for finding in coded:
        for key in finding.key_images:
            seen.setdefault(str(key.dataset.SOPInstanceUID), key.dataset)
    if not seen:
        return None
    device = _device(device_uid, model_name, model_version)
    labels = ", ".join(f.label for f in coded if f.key_images)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=list(seen.values()),
        observer_device_context=device,
        description=f"AI draft key images (unverified): {labels}"[:1024])
    evidence = list(seen.values())
    first = _with_type2(evidence[0])
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=[first, *evidence[1:]], content=content, series_instance_uid=generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, specific_character_set="ISO_IR 192")  # as the SR's
    kos.SeriesDescription = f"{SERIES_DESCRIPTION} key images ({model_name})"[:64]
    _keep_character_set(kos, evidence[0])
    return kos


def sr_coded_findings(sr: Dataset) -> list[dict[str, object]]:
    """The coded findings read back: concept meaning, laterality, probability, key SOP Instance
    UIDs (what a viewer shows under Findings)."""
    out: list[dict[str, object]] = []
    for container in sr.ContentSequence:
        if container.ConceptNameCodeSequence[0].CodeValue != "121070":
            continue
        for item in container.get("ContentSequence", []):
            if item.ValueType != "CODE":
                continue
            row: dict[str, object] = {"finding": item.ConceptCodeSequence[0].CodeMeaning,
                                      "code": item.ConceptCodeSequence[0].CodeValue,
                                      "laterality": None, "probability": None, "images": []}
            for child in item.get("ContentSequence", []):
                if child.ValueType == "CODE":
                    row["laterality"] = child.ConceptCodeSequence[0].CodeMeaning
                elif child.ValueType == "NUM":
                    row["probability"] = float(child.MeasuredValueSequence[0].NumericValue)
                elif child.ValueType == "IMAGE":
                    ref = child.ReferencedSOPSequence[0]
                    row["images"].append(str(ref.ReferencedSOPInstanceUID))  # type: ignore
            out.append(row)
    return out


def sr_text(sr: Dataset) -> tuple[str, str]:
    """(findings, impression) read back from an SR built by :func:`build_report_sr`."""
    found = {"121071": "", "121073": ""}

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in \
                item else ""
            if code in found and "TextValue" in item:
                found[code] = str(item.TextValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found["121071"], found["121073"]
