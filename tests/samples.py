"""DICOM test data: the real files in ``../shared/dicom-samples`` (or ``$MSVLM_SAMPLES``) when
they are there, and the same kinds of file built here from phantoms, always.

A fresh clone has no ``../shared``; every capability the real files check is also checked on a
:class:`Samples` set built by :func:`build_samples`: an axial CT series written by
``storage.volumes.write_ct_series`` from a phantom, one MR image in every transfer syntax the
conformance statement claims (pydicom's encoders for RLE, deflate, JPEG-LS and JPEG 2000, dcmtk's
``dcmcjpeg`` for the JPEG processes, which no Python package here encodes), and odd files: no
file meta, truncated pixel data, big endian, patient names in Arabic and Japanese character sets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
    ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, JPEGLSNearLossless, MRImageStorage,
    RLELossless, UID, generate_uid,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MSVLM_SAMPLES") or ROOT.parent / "shared" / "dicom-samples")
REAL_CT_STUDY_UID = "1.3.6.1.4.1.14519.5.2.1.21087345762211724523378497892240459677"
CHARSET_FILES = ("chrArab.dcm", "chrH31.dcm", "chrJapMulti.dcm")
DCMCJPEG = "/usr/bin/dcmcjpeg"

# dcmtk storescu's option that proposes a transfer syntax (None: storescu has no such option)
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": None, "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
}


@dataclass(frozen=True)
class Samples:
    """One set of test files (``kind`` "built" or "shared") laid out like ``dicom-samples``."""

    kind: str
    ct_dir: Path  # one axial CT series
    ct_study_uid: str
    mr_dir: Path  # the same MR image in several transfer syntaxes; sorted names, first = reference
    odd_dir: Path  # no meta, truncated, big endian, non-ASCII names (CHARSET_FILES)
    lossy: tuple[str, ...] = ()  # MR files whose pixels only approximate the reference

    @property
    def ct_files(self) -> list[Path]:
        return sorted(self.ct_dir.glob("*.dcm"))

    @property
    def mr_files(self) -> list[Path]:
        return sorted(self.mr_dir.glob("*.dcm"))

    @property
    def odd_files(self) -> list[Path]:
        return sorted(self.odd_dir.glob("*.dcm"))


def shared_samples() -> Samples | None:
    """The real files, or None where they are not beside the repository."""
    if not SHARED.is_dir():
        return None
    return Samples("shared", SHARED / "ct-abdomen-tcia", REAL_CT_STUDY_UID,
                   SHARED / "mr-transfer-syntaxes", SHARED / "odd-files")


def build_samples(root: Path, ct_slices: int = 134, matrix: int = 64) -> Samples:
    """Write the built set under ``root`` (a few seconds); see the module docstring."""
    from models.phantom import generate_case
    from storage.volumes import StudyInfo, write_ct_series

    study_uid = "1.2.826.0.1.3680043.10.1452.777"
    view = generate_case(777, phases=("non_contrast",), slices=ct_slices, matrix=matrix).views[0]
    write_ct_series(root / "ct", view.pixels, view.z_mm, view.pixel_spacing_mm, "axial",
                    view.phase, StudyInfo(study_uid, "PH777", "PHANTOM^CT"))
    lossy = _write_mr_transfer_syntaxes(root / "mr", view.pixels[ct_slices // 2])
    _write_odd_files(root / "odd", view.pixels[ct_slices // 2])
    return Samples("built", root / "ct", study_uid, root / "mr", root / "odd", lossy)


def mr_image(hu_slice: np.ndarray, bits: int = 12) -> Dataset:
    """One axial MR image (EPI, tilted ~6 degrees like the real sample) from a phantom slice."""
    pixels = np.clip((hu_slice + 1024) * (2**bits - 1) / 4095, 0, 2**bits - 1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["msvlm-node test MR image"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = "20260102"
    ds.StudyTime = ds.SeriesTime = "090000"
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "msvlm-node phantom"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = "ax_asc_epi"
    ds.PatientName = "PHANTOM^MR"
    ds.PatientID = "PHMR1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.ScanningSequence, ds.SequenceVariant = "EP", "SK"
    ds.ScanOptions, ds.MRAcquisitionType = "", "2D"
    ds.RepetitionTime, ds.EchoTime = 3000, 30
    ds.SliceThickness = 3
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["msvlm-node test MR study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["msvlm-node test MR series"])
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.ImagePositionPatient = [-104.0, -96.7, 20.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.99415096409965, -0.1079993545339]
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["msvlm-node test MR frame"])
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu_slice.shape
    ds.PixelSpacing = [3.25, 3.25]
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    return ds


def _write_mr_transfer_syntaxes(folder: Path, hu_slice: np.ndarray) -> tuple[str, ...]:
    """The MR image in each claimed transfer syntax, each file its own SOP instance; returns
    the lossy files' names."""
    folder.mkdir(parents=True, exist_ok=True)

    def image(name: str, bits: int = 12) -> Dataset:
        ds = mr_image(hu_slice, bits)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["msvlm-node test MR", name])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    lossy = []
    for name, syntax, kwargs in (
            ("01-explicit-le.dcm", ExplicitVRLittleEndian, None),
            ("02-implicit-le.dcm", ImplicitVRLittleEndian, None),
            ("03-explicit-be.dcm", ExplicitVRBigEndian, None),
            ("04-deflated.dcm", DeflatedExplicitVRLittleEndian, None),
            ("05-rle.dcm", RLELossless, {}),
            ("06-jpegls-lossless.dcm", JPEGLSLossless, {}),
            ("07-jpegls-near.dcm", JPEGLSNearLossless, {"jls_error": 2}),
            ("08-j2k-lossless.dcm", JPEG2000Lossless, {}),
            ("09-j2k.dcm", JPEG2000, {"j2k_cr": [5]})):
        ds = image(name)
        if syntax == ExplicitVRBigEndian:
            big_endian(ds)
        elif kwargs is None:
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax, **kwargs)
        ds.save_as(folder / name, enforce_file_format=True)
        if syntax in (JPEGLSNearLossless, JPEG2000):
            lossy.append(name)
    if os.access(DCMCJPEG, os.X_OK):  # the JPEG processes: dcmtk encodes them
        for name, option, bits in (("10-jpeg-lossless-p14.dcm", "+el", 12),
                                   ("11-jpeg-lossless-sv1.dcm", "+e1", 12),
                                   ("12-jpeg-extended.dcm", "+ee", 12),
                                   ("13-jpeg-baseline.dcm", "+eb", 8)):  # baseline: 8-bit only
            source = folder.parent / "uncompressed.dcm"
            image(name, bits).save_as(source, enforce_file_format=True)
            subprocess.run([DCMCJPEG, option, "+un", str(source), str(folder / name)],
                           check=True, capture_output=True, timeout=60)
            source.unlink()
            if option in ("+ee", "+eb"):
                lossy.append(name)
    return tuple(lossy)


def big_endian(ds: Dataset) -> Dataset:
    """``ds`` (16-bit pixels) to be written as Explicit VR Big Endian (pixel words swapped)."""
    ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    return ds


def _write_odd_files(folder: Path, hu_slice: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # no preamble, no file meta: a bare data set as some older archives export
    bare = mr_image(hu_slice)
    bare.SOPInstanceUID = generate_uid(entropy_srcs=["odd no meta"])
    del bare.file_meta
    pydicom.filewriter.dcmwrite(folder / "ExplVR_LitEndNoMeta.dcm", bare, implicit_vr=False,
                                little_endian=True)
    # pixel data shorter than its header says
    truncated = mr_image(hu_slice)
    truncated.SOPInstanceUID = generate_uid(entropy_srcs=["odd truncated"])
    truncated.file_meta.MediaStorageSOPInstanceUID = truncated.SOPInstanceUID
    path = folder / "MR_truncated.dcm"
    truncated.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - len(data) // 4])
    # retired big endian
    big = big_endian(mr_image(hu_slice))
    big.SOPInstanceUID = generate_uid(entropy_srcs=["odd big endian"])
    big.file_meta.MediaStorageSOPInstanceUID = big.SOPInstanceUID
    big.save_as(folder / "ExplVR_BigEnd.dcm", enforce_file_format=True)
    # patient names in other character sets (the names of pydicom's charset test files)
    for name, charset, patient in (
            ("chrArab.dcm", "ISO_IR 127", "قباني^لنزار"),
            ("chrH31.dcm", ["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
            ("chrJapMulti.dcm", ["", "ISO 2022 IR 87"], "やまだ^たろう")):
        ds = mr_image(hu_slice)
        ds.SpecificCharacterSet = charset
        ds.PatientName = patient
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["odd study", name])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["odd series", name])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["odd", name])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / name, enforce_file_format=True)


def transfer_syntax(path: Path) -> UID:
    """The file's transfer syntax (as read, for a file without meta)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    if "TransferSyntaxUID" in ds.file_meta:
        return UID(ds.file_meta.TransferSyntaxUID)
    implicit, little = ds.original_encoding
    return (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little
            else ExplicitVRBigEndian)


def copy_tree(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest
