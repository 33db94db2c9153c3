"""The DICOM volume reader (highdicom volumes): classic and enhanced multi-frame series (several
objects per series), compressed transfer syntaxes, irregular spacing, gantry tilt, orientation
jitter, and reasons a radiographer can read for what cannot be read."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from storage.volumes import (
    ORIENTATION_TOLERANCE_DEG, HeaderCache, StudyInfo, VolumeError, read_series,
    read_series_headers, read_slice, write_ct_series,
)


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
    [volume] = read_series(paths[::-1])
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
    [volume] = read_series([path])
    assert np.array_equal(volume.pixels, pixels)
    assert np.allclose(volume.z_mm, z)


def test_compressed_series(series: tuple[np.ndarray, list[float], list[Path]]) -> None:
    pixels, _, paths = series
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert np.array_equal(read_series(paths)[0].pixels, pixels)


def test_a_missing_slice_keeps_each_slice_position(
        series: tuple[np.ndarray, list[float], list[Path]]) -> None:
    pixels, z, paths = series
    [volume] = read_series(paths[:2] + paths[3:])  # slice 2 lost: irregular spacing
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


def enhanced(paths: list[Path], out: Path, series_uid: str, number: int) -> Path:
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=series_uid, series_number=2,
        sop_instance_uid=generate_uid(), instance_number=number)
    image.save_as(out)
    return out


def test_several_multiframe_objects_in_one_series_are_one_volume_each(
        series: tuple[np.ndarray, list[float], list[Path]], tmp_path: Path) -> None:
    pixels, z, paths = series  # e.g. Siemens XA / Philips enhanced MR: one object per stack
    uid = generate_uid()
    first = enhanced(paths[:3], tmp_path / "a.dcm", uid, 1)
    second = enhanced(paths[3:], tmp_path / "b.dcm", uid, 2)
    volumes = read_series([second, first])
    assert len(volumes) == 2
    by_start = sorted(volumes, key=lambda v: float(v.z_mm[0]))
    assert np.array_equal(by_start[0].pixels, pixels[:3])
    assert np.array_equal(by_start[1].pixels, pixels[3:])
    assert np.allclose(by_start[1].z_mm, z[3:])
    assert {v.series_instance_uid for v in volumes} == {uid}


def oblique(tmp_path: Path, jitter: float) -> tuple[np.ndarray, list[Path]]:
    """An oblique series (tilted 20 degrees about x) whose orientation cosines carry ``jitter``
    in their last digits, different on every slice."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(-1000, 1500, (8, 12, 10)).astype(np.float32)
    paths = write_ct_series(tmp_path / "oblique", pixels, [2.0 * k for k in range(8)],
                            (0.7, 0.7), "axial", "non_contrast",
                            StudyInfo("1.2.826.0.1.3680043.10.1452.11", "P11"))
    a = np.radians(20)
    row, col = np.array([1.0, 0, 0]), np.array([0, np.cos(a), -np.sin(a)])
    normal = np.cross(row, col)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        noise = rng.uniform(-jitter, jitter, 6)
        ds.ImageOrientationPatient = [round(float(v), 8) for v in np.r_[row, col] + noise]
        ds.ImagePositionPatient = [round(float(v), 4) for v in (-3.15 * row - 3.85 * col
                                                                + 2.0 * k * normal)]
        ds.save_as(path)
    return pixels, paths


def test_orientation_jitter_is_one_oblique_volume(tmp_path: Path) -> None:
    pixels, paths = oblique(tmp_path, 1e-5)
    [volume] = read_series(paths)
    assert np.array_equal(volume.pixels, pixels)
    assert np.allclose(np.diff(volume.z_mm), 2.0, atol=1e-3)


def test_real_mixed_orientations_are_refused_with_the_angle(tmp_path: Path) -> None:
    _, paths = oblique(tmp_path, 0.0)
    ds = pydicom.dcmread(paths[4])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # one slice axial: 20 degrees off
    ds.save_as(paths[4])
    with pytest.raises(VolumeError, match="several orientations .up to 20.0 degrees"):
        read_series(paths)
    assert ORIENTATION_TOLERANCE_DEG < 1


@pytest.mark.parametrize("damage, words", [
    (lambda ds: delattr(ds, "PixelSpacing"), "missing or invalid: Pixel Spacing"),
    (lambda ds: delattr(ds, "Rows"), "missing or invalid: Rows"),
    (lambda ds: setattr(ds, "ImagePositionPatient", None), "lacks position or orientation"),
])
def test_unreadable_series_give_a_reason_a_person_can_read(
        series: tuple[np.ndarray, list[float], list[Path]], damage: object, words: str) -> None:
    _, _, paths = series
    for path in paths:
        ds = pydicom.dcmread(path)
        damage(ds)  # type: ignore[operator]
        ds.save_as(path)
    with pytest.raises(VolumeError) as caught:
        read_series(paths)
    reason = str(caught.value)
    assert words in reason
    for python in ("KeyError", "AttributeError", "Tag (", "object has no attribute", "_0"):
        assert python not in reason


def test_truncated_and_damaged_multiframe_reasons(
        series: tuple[np.ndarray, list[float], list[Path]], tmp_path: Path,
        built_samples: object) -> None:
    with pytest.raises(VolumeError, match="pixel data is shorter than the image size"):
        read_series([built_samples.odd_dir / "MR_truncated.dcm"])  # type: ignore[attr-defined]
    _, _, paths = series
    path = enhanced(paths, tmp_path / "e.dcm", generate_uid(), 1)
    ds = pydicom.dcmread(path)
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    ds.save_as(path)
    with pytest.raises(VolumeError) as caught:
        read_series([path])
    assert str(caught.value) == ("multi-frame image 1 is not a volume: a required DICOM "
                                 "attribute is missing or invalid: Pixel Spacing")


def test_headers_kept_while_streaming_are_not_read_again(
        series: tuple[np.ndarray, list[float], list[Path]]) -> None:
    pixels, z, paths = series
    known = HeaderCache()
    for k, path in enumerate(paths):  # streaming reads each slice once
        assert np.array_equal(read_slice(path, known), pixels[k])
    kept = known.get(paths[0])
    on_disk = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert kept is not None and "PixelData" not in kept and kept == on_disk
    ordered, headers, z_read = read_series_headers(paths[::-1], known)
    assert ordered == paths and np.allclose(z_read, z)
    assert all(h is known.get(p) for h, p in zip(headers, paths))  # the kept ones, not re-read
    # a re-sent instance replaces its file: the kept header no longer counts
    ds = pydicom.dcmread(paths[2])
    ds.InstanceNumber = 77
    ds.save_as(paths[2], enforce_file_format=True)
    _, headers, _ = read_series_headers(paths, known)
    assert int(headers[2].InstanceNumber) == 77


def test_header_cache_keeps_the_newest_only(
        series: tuple[np.ndarray, list[float], list[Path]]) -> None:
    _, _, paths = series
    known = HeaderCache(capacity=2)
    for path in paths[:3]:
        read_slice(path, known)
    assert len(known) == 2 and known.get(paths[0]) is None and known.get(paths[2]) is not None
