"""The draft report as a DICOM Comprehensive SR (TID 2000), built with highdicom.

Root container "Diagnostic Imaging Report" (18748-4, LN, template 2000) holding the language, a
device observer context (the node's device UID, name = model name, model name = model version),
Findings (121070) with the Finding text (121071), Impressions (121072) with the Impression text
(121073), and a procedure description saying which series were read. Flags: CompletionFlag
PARTIAL, VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY; the series description says it
is an unverified AI draft; Contributing Equipment names the algorithm and its version (IHE AI
Results); the evidence references every instance that was read; a re-report references the
earlier SR (Predecessor Documents); the patient's Specific Character Set is kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node import __version__

SERIES_DESCRIPTION = "AI DRAFT - UNVERIFIED"
MANUFACTURER = "msvlm-node"


@dataclass(frozen=True)
class SeriesRead:
    """One series the model read (for the statement in the report)."""

    series_instance_uid: str
    series_number: int | None
    description: str
    plane: str
    phase: str
    images: int


def statement(series: Sequence[SeriesRead]) -> str:
    parts = [f"series {s.series_number if s.series_number is not None else '?'}"
             f" ({s.description or 'no description'}; {s.plane}, {s.phase.replace('_', ' ')}, "
             f"{s.images} images)" for s in series]
    return ("Draft written by an AI model from " + "; ".join(parts) + ". Unverified: to be "
            "reviewed and verified by a radiologist.")


def build_report_sr(findings: str, impression: str, model_name: str, model_version: str,
                    device_uid: str, evidence: Sequence[Dataset], series_read: Sequence[SeriesRead],
                    previous: Sequence[Dataset] = (), series_number: int = 9901,
                    series_instance_uid: str | None = None) -> Dataset:
    """Build the SR; ``evidence`` are the headers of every instance that was read.

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
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=model_name[:64], manufacturer_name=MANUFACTURER,
            model_name=model_version))
    root = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report"),
        template_id="2000")
    findings_item = hd.sr.ContainerContentItem(name=codes.DCM.Findings,
                                               relationship_type="CONTAINS")
    findings_item.ContentSequence = [hd.sr.TextContentItem(  # type: ignore[assignment]
        name=codes.DCM.Finding, value=findings or "(none)", relationship_type="CONTAINS")]
    impressions = hd.sr.ContainerContentItem(name=codes.DCM.Impressions,
                                             relationship_type="CONTAINS")
    impressions.ContentSequence = [hd.sr.TextContentItem(  # type: ignore[assignment]
        name=codes.DCM.Impression, value=impression or "(none)", relationship_type="CONTAINS")]
    procedure = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("121064", "DCM", "Current Procedure Descriptions"),
        relationship_type="CONTAINS")
    procedure.ContentSequence = [hd.sr.TextContentItem(  # type: ignore[assignment]
        name=hd.sr.CodedConcept("121065", "DCM", "Procedure Description"),
        value=statement(series_read), relationship_type="CONTAINS")]
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
    # value); it builds the SR in UTF-8 and the patient's own set is put back afterwards, so the
    # names copied from the evidence are written in the character set they came in.
    first = copy.deepcopy(evidence[0])  # type 2 study/patient attributes may be absent
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
                    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in first:
            setattr(first, keyword, "")
    sr = hd.sr.ComprehensiveSR(
        evidence=[first, *evidence[1:]], content=root, specific_character_set="ISO_IR 192",
        series_instance_uid=series_instance_uid or generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=False, is_final=False, is_verified=False,
        previous_versions=list(previous) or None, contributing_equipment=[equipment])
    sr.SeriesDescription = f"{SERIES_DESCRIPTION} ({model_name})"[:64]
    sr.PreliminaryFlag = "PRELIMINARY"
    charset = evidence[0].get("SpecificCharacterSet")
    if charset:
        sr.SpecificCharacterSet = charset
    return sr


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
