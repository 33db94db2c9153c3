"""Synthetic chest CT studies with radiology reports, deterministic from a seed.

Each case is a chest CT in Hounsfield units with approximate anatomy (body wall and fat, lungs
with vessels and airways, heart, aorta, pulmonary arteries, trachea, oesophagus, spine, ribs),
any of the 18 CT-RATE abnormalities rendered visibly plus pulmonary embolism, and a report whose
every statement is true of the volume. Designed to test what MS-VLM claims: small nodules occupy
only the slices they intersect; slice count (16-400) and thickness (0.6-5 mm) vary; the embolism
(a filling defect in opacified pulmonary arteries) is visible only in the arterial series; optional
coronal and sagittal reformats.

Coordinates are LPS millimetres (x to the patient's left, y posterior, z superior); arrays are
``(S, H, W)`` with rows along +y and columns along +x, slices by increasing z (see ``View``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from models.view import View

LABELS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]
"""The 18 CT-RATE abnormality labels, in CT-RATE's column order."""
PE_LABEL = "Pulmonary embolism"
ALL_LABELS = LABELS + [PE_LABEL]

LOBES = {"right": ["upper", "middle", "lower"], "left": ["upper", "lower"]}


@dataclass
class Nodule:
    side: str
    lobe: str
    diameter_mm: float
    center_mm: tuple[float, float, float]


@dataclass
class PhantomCase:
    """Ground truth and images of one synthetic study."""

    study_id: str
    seed: int
    labels: dict[str, bool]
    findings: str
    impression: str
    views: list[View]
    nodules: list[Nodule] = field(default_factory=list)
    sides: dict[str, str] = field(default_factory=dict)
    embolus: dict[str, Any] | None = None
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    nodule_order: str = "size"  # how its reports list the nodules (generate_case)

    def ground_truth(self) -> dict[str, Any]:
        """JSON-ready case-level truth (written next to the images)."""
        return {"study_id": self.study_id, "seed": self.seed, "labels": self.labels,
                "nodules": [vars(n) for n in self.nodules], "sides": self.sides,
                "embolus": self.embolus, "findings": self.findings,
                "impression": self.impression,
                "views": [{"plane": v.plane, "phase": v.phase, "slices": v.num_slices}
                          for v in self.views]}


class _Volume:
    """An HU volume with a voxel grid in mm and shape-drawing helpers (bounding-box limited)."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 z0: float) -> None:
        S, H, W = shape
        self.dz, self.dy, self.dx = spacing
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.z = z0 + np.arange(S, dtype=np.float32) * self.dz
        self.y = (np.arange(H, dtype=np.float32) - (H - 1) / 2) * self.dy
        self.x = (np.arange(W, dtype=np.float32) - (W - 1) / 2) * self.dx

    def _box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        out = []
        for axis, (a, b) in zip((self.z, self.y, self.x), zip(lo, hi)):
            i0 = int(np.searchsorted(axis, a, "left"))
            i1 = int(np.searchsorted(axis, b, "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def grid(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, ...]:
        return (self.z[box[0]][:, None, None], self.y[box[1]][None, :, None],
                self.x[box[2]][None, None, :])

    def ellipsoid_mask(self, center: Any, semi: Any) -> tuple[Any, np.ndarray] | None:
        c, r = np.asarray(center, np.float32), np.asarray(semi, np.float32)
        box = self._box(c[[2, 1, 0]] - r[[2, 1, 0]], c[[2, 1, 0]] + r[[2, 1, 0]])
        if box is None:
            return None
        z, y, x = self.grid(box)
        d = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2
        return box, d <= 1.0

    def _fill(self, got: tuple[Any, np.ndarray] | None, value: float, where: Any) -> None:
        if got is None:
            return
        box, mask = got
        if where is not None:
            mask = mask & where[box]
        self.hu[box][mask] = value

    def ellipsoid(self, center: Any, semi: Any, value: float, where: Any = None) -> None:
        self._fill(self.ellipsoid_mask(center, semi), value, where)

    def tube_mask(self, p0: Any, p1: Any, radius: float) -> tuple[Any, np.ndarray] | None:
        a, b = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
        lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
        box = self._box(lo[[2, 1, 0]], hi[[2, 1, 0]])
        if box is None:
            return None
        z, y, x = self.grid(box)
        ab = b - a
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / max(
            float(ab @ ab), 1e-6)
        t = np.clip(t, 0.0, 1.0)
        d2 = ((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2
              + (z - a[2] - t * ab[2]) ** 2)
        return box, d2 <= radius ** 2

    def tube(self, p0: Any, p1: Any, radius: float, value: float, where: Any = None) -> None:
        self._fill(self.tube_mask(p0, p1, radius), value, where)


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


class _Anatomy:
    """Patient-specific geometry shared by every phase and plane of one case."""

    def __init__(self, rng: np.random.Generator) -> None:
        s = float(rng.uniform(0.85, 1.1))
        self.scale = s
        self.body = (150 * s, 105 * s)
        self.lung_height = float(rng.uniform(190, 240)) * s
        self.z_base = 0.0
        self.z_apex = self.lung_height
        self.lungs = {"right": (-72 * s, 0.0), "left": (72 * s, 0.0)}
        self.lung_semi = (52 * s, 72 * s)
        self.heart_center = (15 * s, -22 * s, 0.3 * self.lung_height)
        self.heart_semi = (52 * s, 42 * s, 42 * s)
        self.carina_z = 0.62 * self.lung_height
        self.pa_z = 0.55 * self.lung_height
        self.vessels = [(side, rng.uniform(-1, 1, size=(3,)), rng.uniform(-1, 1, size=(3,)),
                         float(rng.uniform(1.2, 2.5)))
                        for side in ("right", "left") for _ in range(14)]

    def lung_mask(self, vol: _Volume, side: str) -> np.ndarray:
        cx, cy = self.lungs[side]
        z = vol.z[:, None, None]
        frac = np.clip((z - self.z_base) / (self.z_apex - self.z_base), 0, 1)
        taper = np.sqrt(np.clip(1 - np.maximum(frac - 0.55, 0) / 0.45, 0, 1) ** 2 * 0.85 + 0.15)
        inside_z = (z >= self.z_base) & (z <= self.z_apex)
        rx, ry = self.lung_semi[0] * taper, self.lung_semi[1] * taper
        x, y = vol.x[None, None, :], vol.y[None, :, None]
        base_cut = (frac > 0.02) | (y > 0)  # the dome: posterior sulcus reaches lowest
        return inside_z & base_cut & (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1)

    def lobe_of(self, side: str, x: float, y: float, z: float) -> str:
        frac = (z - self.z_base) / (self.z_apex - self.z_base)
        if side == "right":
            if frac > 0.6:
                return "upper"
            if frac > 0.3 and y < 0:
                return "middle"
            return "lower"
        return "upper" if frac > 0.45 else "lower"


def _render(an: _Anatomy, case: dict[str, Any], shape: tuple[int, int, int],
            spacing: tuple[float, float, float], arterial: bool,
            rng: np.random.Generator) -> np.ndarray:
    """Draw one phase of the case into an HU volume."""
    vol = _Volume(shape, spacing, an.z_base - 20.0)
    s = an.scale
    contrast = 330.0 if arterial else 40.0
    top = an.z_apex + 30
    bottom = an.z_base - 30
    # body wall: fat, then muscle
    x, y = vol.x[None, None, :], vol.y[None, :, None]
    body = ((x / an.body[0]) ** 2 + (y / an.body[1]) ** 2) <= 1
    vol.hu[np.broadcast_to(body, vol.hu.shape)] = -100.0
    inner = ((x / (an.body[0] - 12)) ** 2 + (y / (an.body[1] - 12)) ** 2) <= 1
    vol.hu[np.broadcast_to(inner, vol.hu.shape)] = 45.0
    # ribs: arcs at the body edge every ~25 mm
    for zr in np.arange(an.z_base, an.z_apex, 25.0 * s):
        ring = (((x / (an.body[0] - 16)) ** 2 + (y / (an.body[1] - 16)) ** 2 <= 1)
                & ~(((x / (an.body[0] - 24)) ** 2 + (y / (an.body[1] - 24)) ** 2) <= 1)
                & (np.abs(x) > 25))
        sl = (vol.z >= zr) & (vol.z < zr + 7)
        vol.hu[sl] = np.where(ring, 650.0, vol.hu[sl])
    # lungs
    lungs = {side: an.lung_mask(vol, side) for side in ("right", "left")}
    lung_any = lungs["right"] | lungs["left"]
    vol.hu[lung_any] = -860.0
    # spine
    vol.tube((0, 88 * s, bottom), (0, 88 * s, top), 17 * s, 700)
    vol.tube((0, 88 * s, bottom), (0, 88 * s, top), 13 * s, 280)
    # heart, aorta, pulmonary arteries, trachea, oesophagus
    hc, hs = np.array(an.heart_center), np.array(an.heart_semi)
    if case["labels"]["Cardiomegaly"]:
        hs = hs * 1.32
    if case["labels"]["Pericardial effusion"]:
        vol.ellipsoid(hc, hs + 7, 12.0)
    vol.ellipsoid(hc, hs, 42.0)
    vol.ellipsoid(hc + np.array([0, 4 * s, 0]), hs * 0.55, contrast)  # blood pool
    if case["labels"]["Coronary artery wall calcification"]:
        for angle in np.linspace(0.3, 2.6, 5):
            p = hc + np.array([np.cos(angle) * hs[0] * 0.95, -np.sin(angle) * hs[1] * 0.95,
                               hs[2] * 0.3])
            vol.ellipsoid(p, (2.2, 2.2, 2.2), 900.0)
    aorta_r = 13 * s
    desc = (22 * s, 55 * s)
    vol.tube((desc[0], desc[1], bottom), (desc[0], desc[1], an.carina_z + 25), aorta_r, contrast)
    vol.tube((10 * s, -30 * s, an.heart_center[2]), (10 * s, -30 * s, an.carina_z + 25),
             aorta_r, contrast)
    vol.tube((10 * s, -30 * s, an.carina_z + 25), (desc[0], desc[1], an.carina_z + 25), aorta_r,
             contrast)
    if case["labels"]["Arterial wall calcification"]:
        for k, zc in enumerate(np.linspace(an.z_base + 20, an.carina_z, 6)):
            ang = 0.7 * k
            vol.ellipsoid((desc[0] + aorta_r * np.cos(ang), desc[1] + aorta_r * np.sin(ang), zc),
                          (2.5, 2.5, 3.0), 800.0)
    pa_r = 11 * s
    pa = {"main": ((12 * s, -12 * s, an.pa_z - 25), (12 * s, -12 * s, an.pa_z)),
          "right": ((12 * s, -12 * s, an.pa_z), (-62 * s, 0.0, an.pa_z - 8)),
          "left": ((12 * s, -12 * s, an.pa_z), (62 * s, 0.0, an.pa_z - 4))}
    for name, (p0, p1) in pa.items():
        vol.tube(p0, p1, pa_r if name == "main" else pa_r * 0.8, contrast)
    if case["embolus"] is not None:
        e = case["embolus"]
        a0, a1 = np.array(pa[e["side"]][0]), np.array(pa[e["side"]][1])
        center = a0 + (a1 - a0) * 0.6
        e["center_mm"] = [float(v) for v in center]
        # thrombus attenuates like unenhanced blood: invisible without contrast
        vol.ellipsoid(center, (e["radius_mm"],) * 3, 40.0)
    trachea = (0.0, 22 * s)
    vol.tube((trachea[0], trachea[1], an.carina_z), (trachea[0], trachea[1], top), 10 * s, 60)
    vol.tube((trachea[0], trachea[1], an.carina_z), (trachea[0], trachea[1], top), 8 * s, -1000)
    bronchi = {"right": (-55 * s, 10 * s, an.carina_z - 30), "left": (55 * s, 12 * s,
                                                                    an.carina_z - 40)}
    wall = 4.5 if case["labels"]["Peribronchial thickening"] else 2.0
    for side, end in bronchi.items():
        start = (trachea[0], trachea[1], an.carina_z)
        vol.tube(start, end, 6 * s + wall, 55)
        vol.tube(start, end, 6 * s, -1000)
    vol.tube((6 * s, 50 * s, bottom), (6 * s, 50 * s, top), 7 * s, 40)  # oesophagus
    vol.tube((6 * s, 50 * s, bottom), (6 * s, 50 * s, top), 2 * s, -900)
    # lung vessels, only inside the lungs
    for side, a, b, r in an.vessels:
        cx, cy = an.lungs[side]
        p0 = (cx + a[0] * 40 * s, cy + a[1] * 55 * s, an.z_base + (a[2] + 1) / 2 * an.lung_height)
        p1 = (cx + b[0] * 40 * s, cy + b[1] * 55 * s, an.z_base + (b[2] + 1) / 2 * an.lung_height)
        vol.tube(p0, p1, r, contrast * 0.7 if arterial else 35.0, where=lungs[side])
    _render_findings(vol, an, case, lungs, rng)
    vol.hu += rng.normal(0, case["noise_hu"], vol.hu.shape).astype(np.float32)
    return np.clip(vol.hu, -1024, 3071)


def _render_findings(vol: _Volume, an: _Anatomy, case: dict[str, Any],
                     lungs: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    labels, sides, s = case["labels"], case["sides"], an.scale
    frng = np.random.default_rng(case["finding_seed"])  # identical in every phase

    def in_lung(side: str) -> np.ndarray:
        return lungs[side]

    def lung_point(side: str, zfrac: tuple[float, float]) -> tuple[float, float, float]:
        cx, cy = an.lungs[side]
        z = an.z_base + frng.uniform(*zfrac) * an.lung_height
        return (cx + frng.uniform(-20, 20) * s, cy + frng.uniform(-25, 25) * s, z)

    if labels["Emphysema"]:
        for side in ("right", "left"):
            for _ in range(10):
                vol.ellipsoid(lung_point(side, (0.55, 0.9)), (9, 9, 9), -985.0,
                              where=in_lung(side))
    if labels["Mosaic attenuation pattern"]:
        for side in ("right", "left"):
            for _ in range(8):
                vol.ellipsoid(lung_point(side, (0.1, 0.9)), (16, 16, 16),
                              float(frng.choice([-930.0, -760.0])), where=in_lung(side))
    if labels["Interlobular septal thickening"]:
        side = sides["Interlobular septal thickening"]
        cx, _ = an.lungs[side]
        edge = cx + (-1 if side == "right" else 1) * 38 * s
        for k in range(-4, 5):
            vol.tube((edge, k * 9.0, an.z_base + 10), (edge, k * 9.0, an.z_base + 0.6 *
                                                       an.lung_height), 1.3, -250,
                     where=in_lung(side))
    if labels["Pulmonary fibrotic sequela"]:
        side = sides["Pulmonary fibrotic sequela"]
        p = lung_point(side, (0.15, 0.4))
        for k in range(6):
            q = (p[0] + frng.uniform(-15, 15), p[1] + 40, p[2] + frng.uniform(-15, 15))
            vol.tube(p, q, 1.6, -150, where=in_lung(side))
    if labels["Bronchiectasis"]:
        side = sides["Bronchiectasis"]
        cx, cy = an.lungs[side]
        for k in range(3):
            a = (cx, cy + 10 * k - 10, an.z_base + 0.2 * an.lung_height)
            b = (cx + (15 if side == "left" else -15), cy + 10 * k - 10,
                 an.z_base + 0.45 * an.lung_height)
            vol.tube(a, b, 6.5, 40, where=in_lung(side))
            vol.tube(a, b, 4.5, -1000, where=in_lung(side))
    if labels["Lung opacity"]:
        side = sides["Lung opacity"]
        vol.ellipsoid(lung_point(side, (0.4, 0.7)), (22, 22, 18), -520.0, where=in_lung(side))
    if labels["Consolidation"]:
        side = sides["Consolidation"]
        p = lung_point(side, (0.2, 0.45))
        vol.ellipsoid(p, (24, 24, 20), 35.0, where=in_lung(side))
        vol.tube((p[0], p[1] - 15, p[2]), (p[0], p[1] + 15, p[2]), 2.0, -950,
                 where=in_lung(side))  # air bronchogram
    if labels["Atelectasis"]:
        side = sides["Atelectasis"]
        cx, cy = an.lungs[side]
        vol.ellipsoid((cx, cy + 55 * s, an.z_base + 15), (30 * s, 14 * s, 18), 25.0,
                      where=in_lung(side))
    if labels["Pleural effusion"]:
        side = sides["Pleural effusion"]
        cx, cy = an.lungs[side]
        y = vol.y[None, :, None]
        dependent = (y > cy + 35 * s) & in_lung(side)
        dependent &= (vol.z[:, None, None] < an.z_base + 0.55 * an.lung_height)
        vol.hu[dependent] = 12.0
    for nodule in case["nodules"]:
        vol.ellipsoid(nodule.center_mm, (nodule.diameter_mm / 2,) * 3, 35.0)
    if labels["Lymphadenopathy"]:
        for dx in (-22, 26):
            vol.ellipsoid((dx * s, 5 * s, an.carina_z - 12), (11, 9, 10), 48.0)
    if labels["Hiatal hernia"]:
        vol.ellipsoid((6 * s, 40 * s, an.z_base + 5), (24, 20, 22), 30.0)
        vol.ellipsoid((6 * s, 36 * s, an.z_base + 12), (14, 8, 8), -1000.0)
    if labels["Medical material"]:
        vol.tube((-25 * s, -40 * s, an.z_apex + 20), (0, -30 * s, an.heart_center[2] + 20), 1.6,
                 2500.0)


# -- reports -------------------------------------------------------------------------------------

_POSITIVE: dict[str, list[str]] = {
    "Medical material": ["A central venous catheter is seen with its tip in the superior vena "
                         "cava.", "A central line is present, tip projecting over the SVC."],
    "Arterial wall calcification": ["Atherosclerotic calcifications of the thoracic aortic wall.",
                                    "Calcific plaques are present in the aortic wall."],
    "Cardiomegaly": ["The heart is enlarged.", "Cardiomegaly is present."],
    "Pericardial effusion": ["There is a pericardial effusion.",
                             "A small pericardial effusion is noted."],
    "Coronary artery wall calcification": ["Coronary artery calcifications are present.",
                                           "Calcification of the coronary artery walls."],
    "Hiatal hernia": ["A hiatal hernia is present.", "There is a small hiatal hernia."],
    "Lymphadenopathy": ["Enlarged mediastinal lymph nodes are seen, consistent with "
                        "lymphadenopathy.", "Mediastinal lymphadenopathy is present."],
    "Emphysema": ["Centrilobular emphysema in both upper lobes.",
                  "Emphysematous changes are seen in the upper lobes."],
    "Mosaic attenuation pattern": ["A mosaic attenuation pattern is seen in both lungs.",
                                   "Both lungs show mosaic attenuation."],
    "Pulmonary embolism": ["A filling defect in the {side} pulmonary artery is consistent with "
                           "pulmonary embolism.", "There is pulmonary embolism in the {side} "
                           "pulmonary artery."],
}
_SIDED: dict[str, list[str]] = {
    "Atelectasis": ["Atelectasis at the {side} lung base.",
                    "Subsegmental atelectasis in the {side} lower lobe."],
    "Lung opacity": ["A ground-glass opacity in the {side} lung.",
                     "There is an area of ground-glass opacity in the {side} lung."],
    "Pulmonary fibrotic sequela": ["Fibrotic sequelae in the {side} lung.",
                                   "Fibrotic bands are seen in the {side} lower lung."],
    "Pleural effusion": ["A {side} pleural effusion is present.",
                         "There is a {side}-sided pleural effusion."],
    "Peribronchial thickening": ["Peribronchial thickening of the central airways.",
                                 "The bronchial walls are thickened."],
    "Consolidation": ["Consolidation with air bronchograms in the {side} lung.",
                      "There is a consolidation in the {side} lung."],
    "Bronchiectasis": ["Bronchiectasis in the {side} lower lung.",
                       "Dilated bronchi consistent with bronchiectasis in the {side} lung."],
    "Interlobular septal thickening": ["Interlobular septal thickening in the {side} lung.",
                                       "Thickened interlobular septa in the {side} lung."],
}
_NEGATIVE: dict[str, list[str]] = {
    "Medical material": ["No medical devices."],
    "Arterial wall calcification": ["No aortic wall calcification."],
    "Cardiomegaly": ["Heart size is normal.", "No cardiomegaly."],
    "Pericardial effusion": ["No pericardial effusion."],
    "Coronary artery wall calcification": ["No coronary artery calcification."],
    "Hiatal hernia": ["No hiatal hernia."],
    "Lymphadenopathy": ["No lymphadenopathy.", "No enlarged mediastinal lymph nodes."],
    "Emphysema": ["No emphysema."],
    "Atelectasis": ["No atelectasis."],
    "Lung nodule": ["No pulmonary nodule.", "No lung nodules."],
    "Lung opacity": ["No ground-glass opacity."],
    "Pulmonary fibrotic sequela": ["No fibrotic changes."],
    "Pleural effusion": ["No pleural effusion.", "No pleural effusion is seen."],
    "Mosaic attenuation pattern": ["No mosaic attenuation."],
    "Peribronchial thickening": ["No peribronchial thickening."],
    "Consolidation": ["No consolidation."],
    "Bronchiectasis": ["No bronchiectasis."],
    "Interlobular septal thickening": ["No interlobular septal thickening."],
    "Pulmonary embolism": ["No pulmonary embolism.", "The pulmonary arteries are patent."],
}
_IMPRESSION = {
    "Medical material": "Central venous catheter in place", "Arterial wall calcification":
    "Aortic atherosclerosis", "Cardiomegaly": "Cardiomegaly", "Pericardial effusion":
    "Pericardial effusion", "Coronary artery wall calcification": "Coronary artery disease",
    "Hiatal hernia": "Hiatal hernia", "Lymphadenopathy": "Mediastinal lymphadenopathy",
    "Emphysema": "Emphysema", "Atelectasis": "{side} basal atelectasis", "Lung opacity":
    "{side} ground-glass opacity", "Pulmonary fibrotic sequela": "{side} fibrotic sequelae",
    "Pleural effusion": "{side} pleural effusion", "Mosaic attenuation pattern":
    "Mosaic attenuation", "Peribronchial thickening": "Peribronchial thickening",
    "Consolidation": "{side} consolidation", "Bronchiectasis": "{side} bronchiectasis",
    "Interlobular septal thickening": "{side} interlobular septal thickening",
    "Pulmonary embolism": "Pulmonary embolism in the {side} pulmonary artery",
}


def _write_report(case: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    sentences, impressions = [], []
    labels, sides = case["labels"], case["sides"]
    order = list(ALL_LABELS)
    rng.shuffle(order)
    for label in order:
        if not labels[label]:
            if rng.random() < 0.55 or label in ("Lung nodule", "Pleural effusion"):
                sentences.append(_pick(rng, _NEGATIVE[label]))
            continue
        side = sides.get(label, "")
        if label == "Lung nodule":
            # the largest first, as radiologists lead with the dominant nodule (and as the
            # model's nodule sites are ordered: the text's first nodule is the first site);
            # "placed": in the order they were drawn (the reports before 2026-12-03)
            nodules = (list(case["nodules"]) if case.get("nodule_order") == "placed"
                       else sorted(case["nodules"], key=lambda n: -n.diameter_mm))
            for n in nodules:
                sentences.append(_pick(rng, [
                    "A {d} mm solid nodule in the {side} {lobe} lobe.",
                    "There is a {d} mm pulmonary nodule in the {side} {lobe} lobe.",
                ]).format(d=int(round(n.diameter_mm)), side=n.side, lobe=n.lobe))
            first = nodules[0]
            impressions.append(f"{int(round(first.diameter_mm))} mm nodule in the {first.side} "
                               f"{first.lobe} lobe" + (f" and {len(nodules) - 1} other "
                                                       "nodule(s)" if len(nodules) > 1
                                                       else ""))
            continue
        templates = _SIDED.get(label) or _POSITIVE[label]
        sentences.append(_pick(rng, templates).format(side=side))
        phrase = _IMPRESSION[label].format(side=side)
        impressions.append(phrase[0].upper() + phrase[1:])
    findings = " ".join(sentences)
    if impressions:
        impression = ". ".join(impressions) + "."
    else:
        impression = _pick(rng, ["No acute cardiopulmonary abnormality.",
                                 "Normal chest CT.", "No significant abnormality."])
    return findings, impression


# -- cases ---------------------------------------------------------------------------------------

def generate_case(seed: int, study_id: str | None = None, phases: tuple[str, ...] | None = None,
                  reformats: bool = False, prevalence: float = 0.3,
                  matrix: int = 128, slices: int | None = None,
                  force: dict[str, bool] | None = None,
                  nodule_order: str = "size") -> PhantomCase:
    """One synthetic chest CT study, identical for the same arguments.

    Parameters
    ----------
    seed : int
        Everything follows from it.
    phases : tuple of str, optional
        ``("non_contrast",)``, ``("arterial",)`` or ``("non_contrast", "arterial")`` (default:
        chosen by the seed; two-phase studies in about half of the cases).
    reformats : bool
        Also coronal and sagittal reformats of the first phase.
    prevalence : float
        Probability of each abnormality.
    matrix : int
        In-plane matrix (square).
    slices : int, optional
        Force the slice count (default: 16-400 from the seed, via thickness and coverage).
    force : dict, optional
        Labels to set regardless of the seed (everything else stays as the seed makes it).
    nodule_order : str
        ``"size"``: the report lists the nodules largest first and its impression names the
        largest; ``"placed"``: in the order they were drawn (the reports the detector-1 demo's
        language stages were trained on, runs/demo-detector1.toml; only the text differs).
    """
    if nodule_order not in ("size", "placed"):
        raise ValueError(f"Invalid 'nodule_order' {nodule_order!r} - 'size' or 'placed'")
    rng = np.random.default_rng(seed)
    an = _Anatomy(rng)
    if phases is None:
        phases = (("non_contrast", "arterial") if rng.random() < 0.5
                  else (str(rng.choice(["non_contrast", "arterial"])),))
    fov = float(rng.uniform(320, 380)) * an.scale
    pixel = fov / matrix
    coverage = an.lung_height + 40
    drawn = float(rng.uniform(0.6, 5.0))  # drawn always, so forcing slices changes nothing else
    if slices is None:
        slices = int(np.clip(round(coverage / drawn), 16, 400))
    thickness = coverage / slices
    labels = {label: bool(rng.random() < prevalence) for label in ALL_LABELS}
    for label, value in (force or {}).items():
        if label not in labels:
            raise ValueError(f"Invalid 'force' label {label!r} - one of {ALL_LABELS}")
        labels[label] = value
    if "arterial" not in phases:
        labels[PE_LABEL] = False  # invisible without contrast: never reported
    sides = {label: str(rng.choice(["right", "left"])) for label in ALL_LABELS
             if label in _SIDED or label == PE_LABEL}
    case: dict[str, Any] = {"labels": labels, "sides": sides, "nodules": [],
                            "noise_hu": float(rng.uniform(8, 22)),
                            "finding_seed": int(rng.integers(2**31)), "embolus": None,
                            "nodule_order": nodule_order}
    if labels["Lung nodule"]:
        for _ in range(int(rng.integers(1, 3))):
            case["nodules"].append(_place_nodule(an, rng, pixel))
    if labels[PE_LABEL]:
        case["embolus"] = {"side": sides[PE_LABEL], "radius_mm": float(rng.uniform(5, 7)) *
                           an.scale}
    findings, impression = _write_report(case, rng)
    shape = (slices, matrix, matrix)
    spacing = (thickness, pixel, pixel)
    views: list[View] = []
    for phase in phases:
        hu = _render(an, case, shape, spacing, phase == "arterial",
                     np.random.default_rng([seed, len(views)]))
        z = an.z_base - 20.0 + np.arange(slices) * thickness
        views.append(View(hu, z, (pixel, pixel), "CT", "axial", phase))
    if reformats:
        views += _reformats(views[0], thickness, pixel)
    return PhantomCase(study_id or f"phantom-{seed}", seed, labels, findings, impression, views,
                       case["nodules"], sides, case["embolus"], spacing, nodule_order)


def report_variant(case: PhantomCase, seed: int) -> tuple[str, str]:
    """Another wording and order of the same case's report (every statement still true).

    Training draws a fresh variant each time a study is sampled, so the language model learns
    what the images say rather than memorising one text per study.
    """
    facts = {"labels": case.labels, "sides": case.sides, "nodules": case.nodules,
             "nodule_order": case.nodule_order}
    return _write_report(facts, np.random.default_rng([case.seed, seed]))


def _place_nodule(an: _Anatomy, rng: np.random.Generator, pixel: float) -> Nodule:
    side = str(rng.choice(["right", "left"]))
    diameter = float(rng.choice([6.0, 8.0, 10.0, 14.0, 18.0]))
    cx, cy = an.lungs[side]
    for _ in range(200):
        z = an.z_base + float(rng.uniform(0.15, 0.85)) * an.lung_height
        x = cx + float(rng.uniform(-30, 30)) * an.scale
        y = cy + float(rng.uniform(-45, 35)) * an.scale
        frac = (z - an.z_base) / an.lung_height
        taper = np.sqrt(np.clip(1 - max(frac - 0.55, 0) / 0.45, 0, 1) ** 2 * 0.85 + 0.15)
        rx, ry = an.lung_semi[0] * taper - diameter, an.lung_semi[1] * taper - diameter
        if rx > 0 and ry > 0 and ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1:
            break
    return Nodule(side, an.lobe_of(side, x, y, z), diameter, (x, y, z))


def _reformats(axial: View, thickness: float, pixel: float) -> list[View]:
    """Coronal and sagittal reformats of an axial view, resampled to 2 x pixel spacing."""
    step = max(1, int(round(2 * pixel / pixel)))
    vol = axial.pixels  # (S z, H y, W x)
    # coronal: slices along +y, rows along -z (superior first), columns along +x
    coronal = np.ascontiguousarray(vol[::-1, ::step, :].transpose(1, 0, 2))
    # sagittal: slices along -x ... ordered by increasing position along the normal (-x)
    sagittal = np.ascontiguousarray(vol[::-1, :, ::-step].transpose(2, 0, 1))
    H = vol.shape[1]
    y = (np.arange(0, H, step) - (H - 1) / 2) * pixel
    x = (np.arange(vol.shape[2])[::-step] - (vol.shape[2] - 1) / 2) * pixel
    return [View(coronal, y, (thickness, pixel), "CT", "coronal", axial.phase),
            View(sagittal, -x, (thickness, pixel), "CT", "sagittal", axial.phase)]


def iter_cases(count: int, seed: int, **kwargs: Any) -> Iterator[PhantomCase]:
    """``count`` cases; case ``i`` uses seed ``seed * 100003 + i``."""
    for i in range(count):
        yield generate_case(seed * 100003 + i, f"phantom-{seed}-{i:05d}", **kwargs)
