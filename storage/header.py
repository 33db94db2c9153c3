"""Header-only parsing of received data sets and stored files (pixel data never decoded)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

INDEX_KEYWORDS = [
    # identity and provenance
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
    "SeriesInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "Modality",
    "BodyPartExamined", "SeriesNumber", "SeriesDescription", "ProtocolName", "SeriesTime",
    "AcquisitionTime", "InstanceNumber", "ImagesInAcquisition",
    # geometry and image
    "ImageType", "Rows", "Columns", "NumberOfFrames", "ImageOrientationPatient",
    "ImagePositionPatient", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    # contrast and sequence (phase)
    "ContrastBolusAgent", "ContrastBolusAgentSequence", "ContrastBolusStartTime", "SequenceName",
    "DiffusionBValue", "RepetitionTime", "EchoTime", "InversionTime",
    # provenance of objects we made ourselves (loop prevention)
    "DeviceUID", "ContributingEquipmentSequence",
]
"""What the index and the classifier read from a stored file; nothing else is parsed."""


def read_header_file(path: str | Path, keywords: list[str] | None = INDEX_KEYWORDS) -> Dataset:
    """Parse a stored file's header (file meta included), only ``keywords`` (``None``: all)."""
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keywords)


IDENTIFIER_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}


_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class _Walker:
    """Skips through encoded elements without decoding values (see :func:`scan_identifiers`)."""

    def __init__(self, data: memoryview, implicit: bool, little: bool) -> None:
        self.data, self.end, self.implicit = data, len(data), implicit
        self.tag = struct.Struct("<HH" if little else ">HH")
        self.long = struct.Struct("<I" if little else ">I")
        self.short = struct.Struct("<H" if little else ">H")

    def header(self, pos: int) -> tuple[int, int, int]:
        """(tag, value length, header length) of the element at ``pos``."""
        if pos + 8 > self.end:
            raise ValueError("data set ends inside an element header")
        group, element = self.tag.unpack_from(self.data, pos)
        tag = group << 16 | element
        if self.implicit or group == 0xFFFE:
            return tag, self.long.unpack_from(self.data, pos + 4)[0], 8
        if bytes(self.data[pos + 4:pos + 6]) in _LONG_VRS:
            if pos + 12 > self.end:
                raise ValueError("data set ends inside an element header")
            return tag, self.long.unpack_from(self.data, pos + 8)[0], 12
        return tag, self.short.unpack_from(self.data, pos + 6)[0], 8

    def skip_sequence(self, pos: int) -> int:
        """From the first item of an undefined-length sequence to after its delimiter."""
        while True:
            tag, length, size = self.header(pos)
            pos += size
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise ValueError(f"unexpected tag {tag:08X} in a sequence")
            pos = self.elements(pos, nested=True) if length == _UNDEFINED else pos + length
            if pos > self.end:
                raise ValueError("sequence item runs past the end of the data")

    def elements(self, pos: int, nested: bool, found: dict[str, str] | None = None) -> int:
        """Walk elements from ``pos`` to the item delimiter (nested) or to the end of the data
        (pixel data included: every element must end inside the data, the last at its end)."""
        while pos < self.end:
            tag, length, size = self.header(pos)
            if nested and tag == _ITEM_END:
                return pos + size
            pos += size
            if length == _UNDEFINED:
                pos = self.skip_sequence(pos)
                continue
            if pos + length > self.end:
                raise ValueError(f"element {tag:08X} runs past the end of the data")
            if found is not None and tag in IDENTIFIER_TAGS:
                value = bytes(self.data[pos:pos + length])
                found[IDENTIFIER_TAGS[tag]] = value.rstrip(b"\x00 ").decode("ascii", "replace")
            pos += length
        if nested:
            raise ValueError("sequence item without its delimiter")
        return pos


def scan_identifiers(raw: bytes | memoryview, transfer_syntax_uid: str) -> dict[str, str]:
    """Read the four identifying UIDs from a received data set without building a Dataset.

    Walks every top-level element to the end of the data (through sequences of any length and
    encapsulated pixel data, never decoding values), checking that each fits in the data, and
    keeps the values of :data:`IDENTIFIER_TAGS`: a data set whose lengths lie is refused. This is
    the hot path of the C-STORE handler; a deflated data set is inflated first (``zlib`` errors
    are raised as they come).

    Raises
    ------
    ValueError
        The data set is truncated or its structure is corrupt.
    """
    ts = UID(transfer_syntax_uid)
    data = memoryview(raw)
    if ts == DeflatedExplicitVRLittleEndian:
        data = memoryview(zlib.decompressobj(-zlib.MAX_WBITS).decompress(data))
    found: dict[str, str] = {}
    _Walker(data, ts.is_implicit_VR, ts.is_little_endian).elements(0, False, found)
    return found
