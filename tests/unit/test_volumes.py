"""The DICOM volume reader (highdicom volumes): classic and enhanced multi-frame series,
compressed transfer syntaxes, irregular spacing, gantry tilt."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from storage.volumes import StudyInfo, read_series, write_ct_series


@pytest.fixture
def series(tmp_path: Path) -> tuple[np.ndarray, list[float], list[Path]]:
    rng = np.random.default_rng(3)
    pixels = rng.integers(-1000, 1500, (6, 12, 10)).astype(np.float32)
    z = [-10.0 + 2.5 * k for k in range(6)]
    paths = write_ct_series(tmp_path / "s", pixels, z, (0.7, 0.8), "coronal", "non_contrast",
                            StudyInfo("1.2.826.0.1.3680043.10.1452.9", "P9"))
    return pixels, z, paths


def test_classic_series_in_any_order(series: tuple[np.ndarray, list[float], list[Path]]) -> None:
    pixels, z, paths = series
    volume = read_series(paths[::-1])
    assert np.array_equal(volume.pixels, pixels)
    assert np.allclose(volume.z_mm, z) and volume.pixel_spacing_mm == (0.7, 0.8)
    assert volume.plane == "coronal"


def test_enhanced_multiframe_equals_the_classic_series(
        series: tuple[np.ndarray, list[float], list[Path]], tmp_path: Path) -> None:
    pixels, z, paths = series
    legacy = [pydicom.dcmread(p) for p in paths]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    volume = read_series([path])
    assert np.array_equal(volume.pixels, pixels)
    assert np.allclose(volume.z_mm, z)


def test_compressed_series(series: tuple[np.ndarray, list[float], list[Path]]) -> None:
    pixels, _, paths = series
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert np.array_equal(read_series(paths).pixels, pixels)


def test_a_missing_slice_keeps_each_slice_position(
        series: tuple[np.ndarray, list[float], list[Path]]) -> None:
    pixels, z, paths = series
    volume = read_series(paths[:2] + paths[3:])  # slice 2 lost: irregular spacing
    assert np.allclose(volume.z_mm, z[:2] + z[3:])
    assert np.array_equal(volume.pixels, np.delete(pixels, 2, axis=0))


def test_gantry_tilt_is_refused_with_a_reason(
        series: tuple[np.ndarray, list[float], list[Path]]) -> None:
    _, _, paths = series
    for k, path in enumerate(paths):  # slices shifted sideways as they advance: sheared
        ds = pydicom.dcmread(path)
        x, y, zz = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + 1.5 * k, y, zz]  # along the rows, not the normal
        ds.save_as(path)
    with pytest.raises(ValueError, match="not a volume"):
        read_series(paths)
