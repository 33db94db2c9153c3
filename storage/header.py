"""Header-only parsing of received data sets and stored files (never the pixel data)."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}


def _stop_at_pixels(tag: object, vr: object, length: object) -> bool:
    return int(tag) in _PIXEL_TAGS  # type: ignore[call-overload]


def read_header_bytes(raw: bytes | memoryview, transfer_syntax_uid: str) -> Dataset:
    """Parse the header of a data set as received over the network.

    Parameters
    ----------
    raw : bytes
        The encoded data set (no preamble, no file meta), as in a C-STORE request.
    transfer_syntax_uid : str
        The transfer syntax of the accepted presentation context.

    Returns
    -------
    pydicom.dataset.Dataset
        Every element before the pixel data; values are decoded lazily.

    Raises
    ------
    Exception
        Any error from pydicom or zlib when the bytes cannot be parsed.
    """
    ts = UID(transfer_syntax_uid)
    data = bytes(raw)
    if ts == DeflatedExplicitVRLittleEndian:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
    ds = read_dataset(io.BytesIO(data), ts.is_implicit_VR, ts.is_little_endian,
                      stop_when=_stop_at_pixels)
    return ds


def read_header_file(path: str | Path) -> Dataset:
    """Parse a stored file up to its pixel data (file meta included)."""
    return pydicom.dcmread(path, stop_before_pixels=True)
