"""The CT-RATE layout: writing phantoms in it, and reading it (ours or the real data set) as views.

Layout under ``root``::

    {split}/{split}_{patient}/{split}_{patient}_{scan}/{split}_{patient}_{scan}_{rec}.nii.gz
    {split}_reports.csv     VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN,
                            Impressions_EN
    {split}_metadata.csv    VolumeName, RescaleSlope, RescaleIntercept, XYSpacing, ZSpacing,
                            StudyID, Phase, Plane (the last three are ours: they group views)
    {split}_labels.csv      VolumeName and one 0/1 column per label

CT-RATE's ``*_fixed.nii.gz`` volumes already hold HU: slope/intercept are applied only to
volumes whose name does not say ``_fixed`` and whose NIfTI header carries no scaling of its own,
so they are never applied twice. Our writer stores HU with slope 1 and intercept 0.
"""

from __future__ import annotations

import ast
import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from models.phantom import ALL_LABELS, PhantomCase
from models.view import View

# NIfTI voxel axes (i, j, k) -> patient directions, per plane (see View / ARCHITECTURE):
# axial: columns to the left, rows posterior, slices superior, and the reformats likewise.
AXCODES = {"axial": ("L", "P", "S"), "coronal": ("L", "I", "P"), "sagittal": ("P", "I", "R")}
_RAS_SIGN = {"L": -1, "R": 1, "P": -1, "A": 1, "S": 1, "I": -1}
_RAS_AXIS = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}


@dataclass
class StudyRecord:
    """One study read from a CT-RATE-layout folder."""

    study_id: str
    split: str
    volume_names: list[str]
    views: list[View]
    findings: str
    impression: str
    labels: dict[str, int] = field(default_factory=dict)
    ground_truth: dict[str, Any] | None = None


def _affine(view: View) -> np.ndarray:
    codes = AXCODES.get(view.plane, AXCODES["axial"])
    row_mm, col_mm = view.pixel_spacing_mm
    step = float(np.median(np.diff(view.z_mm))) if view.num_slices > 1 else 1.0
    affine = np.eye(4)
    for axis, (code, size) in enumerate(zip(codes, (col_mm, row_mm, step))):
        affine[:, axis] = 0.0
        affine[_RAS_AXIS[code], axis] = _RAS_SIGN[code] * size
    affine[3, 3] = 1.0
    # origin: the first voxel on the slice normal at z_mm[0]
    k_code = codes[2]
    affine[_RAS_AXIS[k_code], 3] = _RAS_SIGN[k_code] * float(view.z_mm[0])
    return affine


def write_volume(view: View, path: Path) -> None:
    """One view as NIfTI (int16 HU), voxel axes (columns, rows, slices)."""
    import nibabel as nib

    data = np.round(view.pixels).astype(np.int16).transpose(2, 1, 0)  # (i, j, k)
    image = nib.Nifti1Image(data, _affine(view))
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def read_volume(path: Path, plane: str, modality: str = "CT", phase: str = "unknown",
                slope: float = 1.0, intercept: float = 0.0,
                series_instance_uid: str = "") -> View:
    """A NIfTI volume as a :class:`View` in the orientation ARCHITECTURE defines."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation
    from nibabel.orientations import ornt_transform

    image: Any = nib.load(str(path))
    header_scaled = image.dataobj.slope not in (None, 1.0) or image.dataobj.inter not in (None,
                                                                                          0.0)
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if "_fixed" not in path.name and not header_scaled and (slope, intercept) != (1.0, 0.0):
        data = data * np.float32(slope) + np.float32(intercept)
    codes = AXCODES.get(plane, AXCODES["axial"])
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(codes))
    data = apply_orientation(data, transform)
    affine = image.affine @ nib.orientations.inv_ornt_aff(transform, image.shape[:3])
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # (i, j, k) spacings
    k_axis = int(np.argmax(np.abs(affine[:3, 2])))
    sign = 1.0 if affine[k_axis, 2] * _RAS_SIGN[codes[2]] > 0 else -1.0
    origin = affine[k_axis, 3] * _RAS_SIGN[codes[2]]
    z = origin + sign * np.arange(data.shape[2]) * zooms[2]
    pixels = np.ascontiguousarray(data.transpose(2, 1, 0))  # (S, H, W)
    return View(pixels, z, (float(zooms[1]), float(zooms[0])), modality, plane, phase,
                series_instance_uid)


def volume_name(split: str, patient: int, scan: str, rec: int) -> str:
    return f"{split}_{patient}_{scan}_{rec}.nii.gz"


def volume_path(root: Path, name: str) -> Path:
    split, patient, scan, _rest = name.split("_", 3)
    return root / split / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / name


class CTRateWriter:
    """Writes phantom cases in the CT-RATE layout, one patient per case."""

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root, self.split = Path(root), split
        self.reports: list[dict[str, Any]] = []
        self.metadata: list[dict[str, Any]] = []
        self.labels: list[dict[str, Any]] = []

    def add(self, case: PhantomCase, patient: int) -> list[str]:
        names = []
        for rec, view in enumerate(case.views, start=1):
            name = volume_name(self.split, patient, "a", rec)
            path = volume_path(self.root, name)
            write_volume(view, path)
            names.append(name)
            self.reports.append({"VolumeName": name, "ClinicalInformation_EN": "Not given.",
                                 "Technique_EN": f"Chest CT, {view.phase.replace('_', ' ')}, "
                                                 f"{view.plane}.",
                                 "Findings_EN": case.findings,
                                 "Impressions_EN": case.impression})
            self.metadata.append({"VolumeName": name, "RescaleSlope": 1, "RescaleIntercept": 0,
                                  "XYSpacing": str([view.pixel_spacing_mm[0],
                                                    view.pixel_spacing_mm[1]]),
                                  "ZSpacing": float(np.median(np.diff(view.z_mm)))
                                  if view.num_slices > 1 else 1.0,
                                  "StudyID": case.study_id, "Phase": view.phase,
                                  "Plane": view.plane})
            self.labels.append({"VolumeName": name, **{label: int(case.labels[label])
                                                       for label in ALL_LABELS}})
        gt = volume_path(self.root, names[0]).parent / "ground_truth.json"
        gt.write_text(json.dumps(case.ground_truth(), indent=1))
        return names

    def close(self) -> None:
        for suffix, rows in (("reports", self.reports), ("metadata", self.metadata),
                             ("labels", self.labels)):
            if not rows:
                continue
            with open(self.root / f"{self.split}_{suffix}.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["VolumeName"]: row for row in csv.DictReader(f)}


def splits(root: str | Path) -> list[str]:
    return sorted(p.name[: -len("_reports.csv")] for p in Path(root).glob("*_reports.csv"))


def read_ctrate(root: str | Path, split: str | None = None,
                load_views: bool = True) -> Iterator[StudyRecord]:
    """Studies of a CT-RATE-layout folder (volumes grouped by ``StudyID``, else by scan)."""
    base = Path(root)
    for name in ([split] if split else splits(base)):
        reports = _read_csv(base / f"{name}_reports.csv")
        metadata = _read_csv(base / f"{name}_metadata.csv")
        labels = _read_csv(base / f"{name}_labels.csv") or _read_csv(
            base / f"{name}_predicted_labels.csv")
        groups: dict[str, list[str]] = defaultdict(list)
        for volume in reports:
            meta = metadata.get(volume, {})
            groups[meta.get("StudyID") or volume.rsplit("_", 1)[0]].append(volume)
        for study_id, volumes in groups.items():
            views = []
            for volume in volumes:
                meta = metadata.get(volume, {})
                if load_views:
                    views.append(read_volume(
                        volume_path(base, volume), meta.get("Plane") or "axial", "CT",
                        meta.get("Phase") or "unknown",
                        float(meta.get("RescaleSlope") or 1.0),
                        float(meta.get("RescaleIntercept") or 0.0), volume))
            first = reports[volumes[0]]
            gt_path = volume_path(base, volumes[0]).parent / "ground_truth.json"
            row = labels.get(volumes[0], {})
            yield StudyRecord(
                study_id, name, volumes, views, first.get("Findings_EN", ""),
                first.get("Impressions_EN", ""),
                {k: int(float(v)) for k, v in row.items() if k != "VolumeName"},
                json.loads(gt_path.read_text()) if gt_path.exists() else None)


def xy_spacing(text: str) -> tuple[float, float]:
    """CT-RATE's ``XYSpacing`` column ("[0.7, 0.7]")."""
    values = ast.literal_eval(text)
    return float(values[0]), float(values[1])
