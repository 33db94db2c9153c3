"""The draft report as an Encapsulated PDF, for viewers that do not render SR (OHIF v3 shows only
TID 1500). Same text as the SR, same study, the same provenance (device UID, algorithm)."""

from __future__ import annotations

import copy
from datetime import datetime

from fpdf import FPDF
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from node.sr import MANUFACTURER, SERIES_DESCRIPTION

ENCAPSULATED_PDF = UID("1.2.840.10008.5.1.4.1.1.104.1")
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
           "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
           "StudyDescription")


def _latin1(text: str) -> str:
    # The PDF core fonts cover Latin-1; anything else is replaced rather than dropped silently.
    return text.encode("latin-1", "replace").decode("latin-1")


def render_pdf(findings: str, impression: str, model_name: str, model_version: str,
               statement: str) -> bytes:
    """The report as a one-page (or longer) PDF document."""
    pdf = FPDF(format="A4")
    pdf.set_compression(False)  # a few kB; the text stays searchable by archives and tests
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(0, 10, "AI DRAFT REPORT - UNVERIFIED", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    pdf.multi_cell(0, 5, _latin1(f"{model_name} (model version {model_version}). {statement}"),
                   new_x="LMARGIN", new_y="NEXT")
    for title, text in (("Findings", findings), ("Impression", impression)):
        pdf.ln(4)
        pdf.set_font("Helvetica", "B", 12)
        pdf.cell(0, 8, title, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 11)
        pdf.multi_cell(0, 6, _latin1(text or "(none)"), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def build_report_pdf(sr: Dataset, document: bytes) -> Dataset:
    """An Encapsulated PDF instance of the same study as ``sr`` (its own series)."""
    now = datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = sr.get("SpecificCharacterSet", "ISO_IR 192")
    for keyword in _COPIED:
        if keyword in sr:
            ds.add_new(keyword, sr[keyword].VR, sr[keyword].value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(sr.SeriesNumber) + 1
    ds.SeriesDescription = str(sr.SeriesDescription)[:64] if "SeriesDescription" in sr \
        else SERIES_DESCRIPTION
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "SYN"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "AI draft report (unverified)"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    if len(document) % 2:
        document += b"\x00"
    ds.EncapsulatedDocument = document
    ds.EncapsulatedDocumentLength = len(document)
    ds.ContributingEquipmentSequence = copy.deepcopy(sr.ContributingEquipmentSequence)
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds
