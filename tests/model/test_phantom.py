"""Phantom corpus: determinism, every label visible and reported, slice-specific nodules,
contrast-only embolism, CT-RATE round trip, NIfTI/DICOM orientation, classification contract."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.ctrate import CTRateWriter, read_ctrate
from models.labeler import RuleLabeler, binary
from models.phantom import ALL_LABELS, PE_LABEL, generate_case, report_variant


def test_same_seed_same_case_and_different_seed_differs() -> None:
    a, b = generate_case(11), generate_case(11)
    assert a.findings == b.findings and a.impression == b.impression and a.labels == b.labels
    assert len(a.views) == len(b.views)
    for va, vb in zip(a.views, b.views):
        np.testing.assert_array_equal(va.pixels, vb.pixels)
        np.testing.assert_array_equal(va.z_mm, vb.z_mm)
    c = generate_case(12)
    assert c.findings != a.findings or c.views[0].pixels.shape != a.views[0].pixels.shape


def test_slice_count_and_thickness_vary_within_bounds() -> None:
    shapes = [generate_case(seed).views[0] for seed in range(12)]
    counts = {v.num_slices for v in shapes}
    assert min(counts) >= 16 and max(counts) <= 400 and len(counts) > 5
    thickness = [float(np.diff(v.z_mm).mean()) for v in shapes]
    assert min(thickness) >= 0.55 and max(thickness) <= 15


def test_every_label_is_rendered_and_reported() -> None:
    labeler = RuleLabeler()
    everything = generate_case(5, phases=("non_contrast", "arterial"), prevalence=1.0)
    assert all(everything.labels.values())
    assert binary(labeler.label(everything.findings + "\n" + everything.impression)) == {
        label: 1 for label in ALL_LABELS}
    nothing = generate_case(5, phases=("non_contrast", "arterial"), prevalence=0.0)
    assert binary(labeler.label(nothing.findings + "\n" + nothing.impression)) == {
        label: 0 for label in ALL_LABELS}
    # each label changes the image: rendered, not only written
    for label in ALL_LABELS:
        on = generate_case(6, phases=("arterial",), prevalence=0.0, force={label: True},
                           slices=64)
        off = generate_case(6, phases=("arterial",), prevalence=0.0, slices=64)
        assert np.abs(on.views[0].pixels - off.views[0].pixels).max() > 100, label
        assert binary(labeler.label(on.findings + "\n" + on.impression))[label] == 1, label


def test_nodule_occupies_only_the_slices_it_intersects() -> None:
    for seed in range(20, 26):
        base = dict(phases=("non_contrast",), prevalence=0.0, slices=120)
        with_nodule = generate_case(seed, force={"Lung nodule": True}, **base)
        without = generate_case(seed, **base)
        view = with_nodule.views[0]
        changed = np.flatnonzero(np.abs(view.pixels - without.views[0].pixels).max(axis=(1, 2)))
        assert changed.size > 0
        for nodule in with_nodule.nodules:
            radius = nodule.diameter_mm / 2
            near = np.abs(view.z_mm - nodule.center_mm[2]) <= radius
            assert near[np.argmin(np.abs(view.z_mm - nodule.center_mm[2]))]
        allowed = np.zeros(view.num_slices, dtype=bool)
        for nodule in with_nodule.nodules:
            allowed |= np.abs(view.z_mm - nodule.center_mm[2]) <= nodule.diameter_mm / 2
        assert allowed[changed].all()  # never in a slice the sphere does not cross
        assert changed.size <= allowed.sum()


def test_smallest_nodule_spans_two_pixels_at_128() -> None:
    case = generate_case(3, force={"Lung nodule": True})
    fov = case.views[0].pixel_spacing_mm[0] * case.views[0].pixels.shape[2]
    assert 6.0 / (fov / 128) >= 2.0


def test_report_leads_with_the_largest_nodule() -> None:
    """The findings list the nodules largest first and the impression names the largest (the
    order of the model's nodule sites, so the first sentence can copy the first site)."""
    from models.evaluate import nodules

    checked = 0
    for seed in range(60):
        case = generate_case(seed, force={"Lung nodule": True}, slices=16)
        sizes = sorted((n.diameter_mm for n in case.nodules), reverse=True)
        if len(set(sizes)) < 2:
            continue
        assert [size for size, _, _ in nodules(case.findings)] == sizes
        largest = max(case.nodules, key=lambda n: n.diameter_mm)
        assert nodules(case.impression)[0] == (largest.diameter_mm, largest.side, largest.lobe)
        assert f"and {len(case.nodules) - 1} other nodule(s)" in case.impression
        assert [size for size, _, _ in nodules(report_variant(case, 1)[0])] == sizes
        # "placed": the order they were drawn (what the detector-1 demo's language stages read), the
        # images and every other sentence the same
        placed = generate_case(seed, force={"Lung nodule": True}, slices=16,
                               nodule_order="placed")
        drawn = [n.diameter_mm for n in placed.nodules]
        assert [size for size, _, _ in nodules(placed.findings)] == drawn
        assert [x for x in placed.findings.split(". ") if "nodule" not in x] == [
            x for x in case.findings.split(". ") if "nodule" not in x]
        np.testing.assert_array_equal(placed.views[0].pixels, case.views[0].pixels)
        checked += drawn != sizes
    assert checked >= 3
    with pytest.raises(ValueError, match="nodule_order"):
        generate_case(1, nodule_order="random")


def test_embolism_visible_only_in_the_arterial_series() -> None:
    base = dict(phases=("non_contrast", "arterial"), prevalence=0.0, slices=96)
    with_pe = generate_case(8, force={PE_LABEL: True}, **base)
    without = generate_case(8, **base)
    assert with_pe.embolus is not None and "pulmonary embolism" in with_pe.findings.lower()
    plain, arterial = (np.abs(a.pixels - b.pixels).max()
                       for a, b in zip(with_pe.views, without.views))
    assert plain == 0.0  # the filling defect has the attenuation of unenhanced blood
    assert arterial > 200
    only_plain = generate_case(8, phases=("non_contrast",), force={PE_LABEL: True})
    assert not only_plain.labels[PE_LABEL] and "embol" not in only_plain.findings.lower()


def test_ctrate_round_trip_preserves_hu_spacing_and_text(tmp_path: Path) -> None:
    cases = [generate_case(30, phases=("non_contrast", "arterial"), reformats=True),
             generate_case(31)]
    writer = CTRateWriter(tmp_path, "valid")
    for i, case in enumerate(cases, start=1):
        writer.add(case, patient=i)
    writer.close()
    studies = {s.study_id: s for s in read_ctrate(tmp_path)}
    assert set(studies) == {c.study_id for c in cases}
    for case in cases:
        study = studies[case.study_id]
        assert study.findings == case.findings and study.impression == case.impression
        assert study.labels == {k: int(v) for k, v in case.labels.items()}
        assert study.ground_truth is not None and study.ground_truth["seed"] == case.seed
        assert [(v.plane, v.phase) for v in study.views] == [(v.plane, v.phase)
                                                             for v in case.views]
        for read, original in zip(study.views, case.views):
            np.testing.assert_array_equal(read.pixels, np.round(original.pixels))
            np.testing.assert_allclose(read.pixel_spacing_mm, original.pixel_spacing_mm,
                                       rtol=1e-5)
            np.testing.assert_allclose(read.z_mm, original.z_mm, atol=1e-3)


def test_fixed_volumes_are_not_rescaled_twice(tmp_path: Path) -> None:
    from models.ctrate import read_volume, write_volume

    view = generate_case(2, slices=20).views[0]
    write_volume(view, tmp_path / "valid_1_a_1_fixed.nii.gz")
    write_volume(view, tmp_path / "valid_1_a_1.nii.gz")
    fixed = read_volume(tmp_path / "valid_1_a_1_fixed.nii.gz", "axial", slope=1.0,
                        intercept=-1024.0)
    raw = read_volume(tmp_path / "valid_1_a_1.nii.gz", "axial", slope=1.0, intercept=-1024.0)
    np.testing.assert_array_equal(fixed.pixels, np.round(view.pixels))
    np.testing.assert_array_equal(raw.pixels, np.round(view.pixels) - 1024)


@pytest.mark.parametrize("view_index", [0, 1, 2])  # axial, coronal, sagittal
def test_nifti_and_dicom_readers_return_identical_arrays(tmp_path: Path,
                                                         view_index: int) -> None:
    from storage.volumes import StudyInfo, read_series, write_ct_series

    case = generate_case(40, phases=("non_contrast",), reformats=True, prevalence=0.0,
                         force={"Pleural effusion": True}, slices=60)
    case.sides["Pleural effusion"] = case.sides["Pleural effusion"]
    writer = CTRateWriter(tmp_path / "ctrate", "valid")
    writer.add(case, patient=1)
    writer.close()
    [study] = list(read_ctrate(tmp_path / "ctrate"))
    from_nifti = study.views[view_index]
    view = case.views[view_index]
    paths = write_ct_series(tmp_path / "dicom", view.pixels, view.z_mm, view.pixel_spacing_mm,
                            view.plane, view.phase, StudyInfo("1.2.3.4", "P1"))
    [from_dicom] = read_series(paths)
    np.testing.assert_array_equal(from_dicom.pixels, from_nifti.pixels)
    np.testing.assert_allclose(from_dicom.z_mm, from_nifti.z_mm, atol=1e-3)
    assert from_dicom.plane == view.plane and from_dicom.phase == "non_contrast"
    if view_index == 0:  # the effusion lies on the patient's side: left = higher column index
        side = case.sides["Pleural effusion"]
        k = int(np.argmin(np.abs(view.z_mm - (view.z_mm[0] + 60))))
        image = from_dicom.pixels[k]
        fluid = (image > -50) & (image < 60)
        W = image.shape[1]
        left, right = fluid[:, W // 2 + 20:].sum(), fluid[:, : W // 2 - 20].sum()
        assert (left > right) if side == "left" else (right > left)


def test_phantom_series_classify_as_written(tmp_path: Path) -> None:
    from storage.files import FileStore
    from storage.index import Index
    from storage.volumes import StudyInfo, write_ct_series

    case = generate_case(50, phases=("non_contrast", "arterial"), reformats=True, slices=40)
    store = FileStore(tmp_path / "store")
    for n, view in enumerate(case.views, start=1):
        for path in write_ct_series(tmp_path / f"s{n}", view.pixels, view.z_mm,
                                    view.pixel_spacing_mm, view.plane, view.phase,
                                    StudyInfo("1.2.826.0.1.3680043.10.1452.9.1", "P50"), n):
            shutil.copy(path, store.incoming / f"{n}-{path.name}")
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}", store)
    index.drain(store.pending())
    [study] = index.studies()
    got = sorted((s.series_number, s.plane, s.phase, s.is_localizer)
                 for s in index.series(study.study_instance_uid))
    expected = sorted((n, v.plane, v.phase, False) for n, v in enumerate(case.views, start=1))
    assert got == expected
