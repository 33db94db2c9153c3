"""A convolutional slice encoder for CPU budgets, behind the same interface as the ViT.

Early convolutions train far faster than a plain ViT from scratch, and the pooling keeps what a
mean over 16-px patches loses: a 6 mm nodule is a few pixels, so besides the mean of the last
feature map every slice carries its spatial maximum, over the whole slice and over each half
(image columns run towards the patient's left, so the halves keep laterality).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride, 1)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
    return nn.Sequential(conv, nn.GroupNorm(min(8, cout), cout), nn.GELU())


class ConvSliceEncoder(nn.Module):
    """``(S, C, H, W)`` -> ``(S, embed_dim)``: a stride-2 stem, then per width in ``channels`` a
    stride-2 and a stride-1 convolution, then mean and max pooling projected to ``embed_dim``.

    GroupNorm, not BatchNorm: a slice's embedding never depends on which other slices share its
    batch, so embeddings computed with and without gradients agree. Without normalisation and
    with PyTorch's default initialisation the activations shrink layer by layer and every
    slice's embedding ends up close to the projection's bias (measured: the loss stays at
    chance).
    """

    def __init__(self, in_channels: int, channels: list[int], embed_dim: int) -> None:
        super().__init__()
        if not channels:
            raise ValueError("Invalid 'cnn_channels' - at least one width")
        layers: list[nn.Module] = [_conv(in_channels, channels[0], 2)]
        width = channels[0]
        for c in channels[1:]:
            layers += [_conv(width, c, 2), _conv(c, c, 1)]
            width = c
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(4 * width, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        f = self.features(pixels)  # (S, C, h, w)
        half = f.shape[-1] // 2
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3)),
                            f[..., :half].amax(dim=(2, 3)), f[..., half:].amax(dim=(2, 3))],
                           dim=1)  # (S, 4C)
        return self.proj(pooled)  # (S, D)


# HU bin edges: air, emphysema, aerated lung, ground glass, fat, fluid, soft tissue, enhanced
# blood, calcium and bone, metal (a CT's materials, not tuned to any finding)
HU_EDGES = (-1024.0, -990.0, -960.0, -920.0, -880.0, -840.0, -800.0, -700.0, -600.0, -500.0,
            -400.0, -300.0, -200.0, -100.0, -50.0, -20.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0,
            60.0, 80.0, 100.0, 150.0, 200.0, 300.0, 500.0, 700.0, 1000.0, 1500.0)


# ``detail``: the same materials with calcium (760-950 HU) apart from cortical bone (~700 HU) and
# dense contrast or bone above 950 HU
DETAIL_HU_EDGES = HU_EDGES[:-3] + (600.0, 660.0, 760.0, 860.0, 950.0, 1100.0, 1500.0)
# coarse materials for the spot responses: air and lung, fat and ground glass, fluid and soft
# tissue, enhanced blood, calcium and bone, metal
MATERIAL_EDGES = torch.tensor([-500.0, -50.0, 120.0, 500.0, 1500.0])
# difference-of-Gaussians response bands in HU (the middle one, |r| < 50, is left out)
BLOB_EDGES = torch.tensor([-400.0, -150.0, -50.0, 50.0, 150.0, 400.0])
BLOB_SIGMAS = (1.0, 2.0, 3.0)  # pixels of the fixed matrix (about 2.7 mm on a 35 cm field)


def _gauss_matrix(n: int, sigma: float, device: torch.device) -> torch.Tensor:
    """``(n, n)`` Gaussian blur along one axis with edge replication, as a matrix (a matrix
    product is far faster on a CPU than a one-channel convolution)."""
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    rows = torch.arange(n)[:, None]
    cols = (rows + t.long()[None, :]).clamp(0, n - 1)  # replicated edges
    m = torch.zeros(n, n)
    m.scatter_add_(1, cols, k.expand(n, -1).contiguous())
    return m.to(device)


def _shifts(x: torch.Tensor, offsets: list[tuple[int, int]]) -> list[torch.Tensor]:
    """``(S, H, W)`` read at ``(i + dy, j + dx)`` for each offset, edges replicated (one
    padding for all of them; the results are views)."""
    H, W = x.shape[-2:]
    p = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    xp = nn.functional.pad(x[:, None], (p, p, p, p), mode="replicate")[:, 0]
    return [xp[:, p + dy:p + dy + H, p + dx:p + dx + W] for dy, dx in offsets]


# ``lesions``: an isolated bright spot inside aerated lung, filter size (pixels) and the distance
# at which lung must surround it in all eight directions; and a gap of soft tissue between
# contrast on both sides along a line at these distances (a filling defect in an enhanced vessel)
ISOLATED_SPOTS = ((1.5, 4), (2.0, 5))
GAP_DISTANCES = (2, 3)


# ``nodules``: compact solid components inside the lung field, found in 3D. Solid: between these
# HU (soft tissue and ground glass, not enhanced blood, so an enhanced vessel is never one); a
# component counts when its largest extent is at most NODULE_MAX_MM, its smallest in-plane
# extent at least NODULE_MIN_MM, its longest extent at most NODULE_ASPECT times its shortest
# (a vessel is long), it fills at least NODULE_FILL of its bounding ellipsoid and aerated lung
# makes at least NODULE_LUNG_SHARE of the voxels around it. Chosen on 150 phantoms of seed 73
# (never a training, validation or held-out seed): per study the largest such component gave
# nodule AUROC 0.85 (small nodules alone 0.83), the per-slice isolated spots 0.74.
NODULE_HU = (-300.0, 150.0)
NODULE_MIN_MM, NODULE_MAX_MM = 4.0, 24.0
NODULE_ASPECT, NODULE_FILL, NODULE_LUNG_SHARE = 2.0, 0.3, 0.5
NODULE_NONE, NODULE_LUNG, NODULE_SOLID, NODULE_THIN = 0, 1, 2, 3  # slice codes (slice_codes)
# ``enhanced_nodules``: in a view with contrast the lung vessels are enhanced (above NODULE_HU),
# so solid tissue in the lung is not a vessel and the thin part the opening removes counts too:
# a 6 mm nodule is about 2.4 pixels across at this matrix and the opening erases it. Measured on
# 200 phantoms of seed 73 (the detector's seed, never trained or validated on): the opened mask
# keeps 1 of 17 small (6 mm) nodules as a component, the unopened one 11; in non-contrast views
# the unopened mask also keeps 302 vessel fragments (a 1.2-2.5 mm vessel cut in thick slices),
# in arterial views 9. Study-level nodule AUROC of the largest component: 0.835 from the opened
# mask in every view, 0.883 (small nodules 0.816 -> 0.883) from a logistic regression of that
# and the unopened mask in enhanced views, kept as a cue of its own. A demo trained with it was
# worse on validation than the detector-1 demo (runs/demo-enhanced.toml): off by default.
ENHANCED_PHASES = ("arterial", "portal_venous")


# ``nodule_detector = 2``: the lung field is what the air inside the body surrounds after an in-
# plane closing of NODULE_FIELD_CLOSING pixels (a nodule touching the lung's edge stays inside;
# version 1 took what any air surrounds, the whole body, so a nodule touching a vessel joined the
# vessel tree, the chest wall and the mediastinum into one component far over NODULE_MAX_MM);
# components are found before the opening, and one counts only when no more than
# NODULE_PART_OF times its voxels of solid tissue lie within one voxel of it (a vessel sampled at
# 2.7 mm pixels falls apart into dots, each as compact as a small nodule, but they lie next to
# each other; an isolated nodule is alone); a component of the opened mask with a 3 x 3 in-plane
# core (a nodule of >= 8 mm touching a vessel) counts as well. Measured on 150 phantoms of the
# detector's seed 73 (never a training, validation or held-out seed), per study the largest
# component: nodule AUROC 0.846 -> 0.890, small (<= 6 mm) nodules 0.825 -> 0.896, the largest
# component is a true nodule in 26 -> 28 of 40 nodule studies (4 of the other 12: the nodule
# lies against the heart or in an effusion, at their density, and is invisible); on 150 of seed
# 74 (used for nothing else): 0.830 -> 0.848, small 0.680 -> 0.734, largest 31 -> 32 of 43.
NODULE_DETECTORS = (1, 2, 3, 4)
NODULE_FIELD_CLOSING = 2
NODULE_PART_OF = 2.0

# ``nodule_detector = 3``: detector 2's lung field, then a learned false-positive reduction (the
# candidate classification of LUNA16-style detectors). Every component of the solid tissue up to
# NODULE_CANDIDATE_MAX_MM (and every component of the opened tissue that none of them covers: a
# nodule touching a vessel) is a candidate; a logistic regression of its shape (NODULE_FEATURES,
# log1p, standardised) gives the probability that it is a nodule, which is the cue (instead of
# its size) and ranks the sites. Fitted by ``bench/fit_nodule_scorer.py`` on 200 phantoms of the
# detector's seed 73 WITH THE NODULES' POSITIONS (a candidate is a nodule when its box holds a
# nodule's centre; the model card says so: real data sets have no such labels, a CT-RATE run
# would fit it on LUNA16-style annotations or keep detector 2). Reported on 150 phantoms of seed
# 74 (used for nothing else): candidate AUROC 0.976; per study the best candidate separates
# nodule studies at AUROC 0.909 (detector 2's largest component 0.848), small (<= 6 mm) nodule
# studies from those without a nodule at 0.867 (0.734), and is a true nodule in 38 of 43 nodule
# studies (32).
NODULE_CANDIDATE_MAX_MM = 30.0
NODULE_FEATURES = ("diameter_mm", "extent_z_mm", "extent_y_mm", "extent_x_mm", "aspect", "fill",
                   "lung_around", "outside_around", "thin_share", "near_ratio", "cored",
                   "largest_area_mm2", "slices", "slice_mm", "pixel_mm", "voxels")
# a candidate is a site (nodule_sites) from this probability: on seed 74 the best candidate of a
# nodule study is a true nodule at >= 0.91 in 9 of 10, the second best distinct one is true in 7
# studies (median 0.95) and false in 143 (median 0.50, 12% >= 0.8)
NODULE_SITE_MIN_P = 0.8
# printed by bench/fit_nodule_scorer.py (2026-12-03), per NODULE_FEATURES
NODULE_SCORER: dict = {
    "mean": np.array([1.7505, 1.6294, 1.8575, 1.8367, 1.3042, 0.7359, 0.5287, 0.2212, 0.5956,
                      2.7895, 0.0137, 2.8408, 1.0976, 1.1688, 1.3021, 1.6186]),
    "std": np.array([0.3260, 0.7193, 0.4992, 0.4969, 0.4495, 0.2712, 0.1282, 0.1801, 0.2333,
                     2.3179, 0.0965, 0.7739, 0.6006, 0.4064, 0.0629, 0.8642]),
    "weight": np.array([0.5638, 1.0432, -0.3608, -0.3311, -1.7370, 0.7125, 1.5287, -0.6815,
                        -0.1495, -0.6101, -0.2814, 1.6006, -0.5833, -0.0446, 0.3512, 0.3407]),
    "bias": -5.1020,
}


# ``nodule_detector = 4``: detector 3's candidates, scored by a small MLP on the same shape numbers
# (NODULE_FEATURES, log1p, standardised -> 32 ReLU -> 1) instead of the logistic regression:
# the linear scorer ranks a 6 mm nodule's candidate below many vessel fragments. Fitted by
# ``bench/fit_nodule_scorer.py --nodules-only --fit-studies 500 --mlp 32`` on 500 phantoms of
# the detector's seed 73, each with one or two nodules (994 nodules, 30,068 candidates; with
# 200 phantoms at prevalence 0.3 there are ~60 nodules and a non-linear scorer had nothing to
# learn from), WITH THE NODULES' POSITIONS as detector 3. Reported on 80 nodule phantoms of
# seed 74 (used for nothing else), against detector 3 on the same candidates: candidate AUROC
# 0.993 (0.982), small (<= 6 mm) nodules' candidates against those of no nodule 0.962 (0.923).
# Its weights ship beside this file (NODULE_MLP_FILE) and an encoder with detector 4 keeps
# them as buffers, so a checkpoint carries the scorer it was trained with.
NODULE_MLP_FILE = Path(__file__).with_name("nodule_scorer.safetensors")
NODULE_MLP_KEYS = ("mean", "std", "w1", "b1", "w2", "b2")
# a candidate is a site from this probability with detector 4: on seed 74 the cut that lets
# through no more false candidates than detector 3's NODULE_SITE_MIN_P (31 of 4,671) keeps 18
# of the 24 small nodules' candidates where detector 3 keeps 11 (bench/fit_nodule_scorer.py)
NODULE_SITE_MIN_P_MLP = 0.85


def site_min_p(detector: int) -> float:
    """The probability from which a candidate is a site (0: detectors 1 and 2 rank by size)."""
    return {3: NODULE_SITE_MIN_P, 4: NODULE_SITE_MIN_P_MLP}.get(detector, 0.0)


@functools.lru_cache(maxsize=1)
def nodule_mlp() -> dict[str, np.ndarray]:
    """Detector 4's scorer as shipped (:data:`NODULE_MLP_FILE`, float64 arrays)."""
    from safetensors.numpy import load_file

    return load_file(str(NODULE_MLP_FILE))


def _disk(radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1)
    return ((t[:, None] ** 2 + t[None, :] ** 2) <= radius * radius + 0.5)[None]  # in-plane


def _check_detector(detector: int) -> None:
    if detector not in NODULE_DETECTORS:
        raise ValueError(f"Invalid 'pyramid_nodule_detector' {detector} - one of "
                         f"{NODULE_DETECTORS}")


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` of ``(S, H, W)`` with in-plane 4-connectivity (each
    slice on its own), by one labelling of the background instead of a dilation iterated to
    convergence: what is not background connected to a slice's edge (the same result, a test;
    1.5-3x faster on a phantom view)."""
    from scipy import ndimage

    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, n = ndimage.label(~mask, plane)
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        outside[edge] = True
    outside[0] = False  # the mask itself
    return ~outside[labels]


def slice_codes(hu: np.ndarray, detector: int = 1) -> np.ndarray:
    """Per pixel of ``(S, H, W)`` HU slices, each on its own: :data:`NODULE_LUNG` (aerated
    lung), :data:`NODULE_SOLID` (solid tissue inside the lung field, after an in-plane
    opening that removes one-pixel vessels and splits what touches through them),
    :data:`NODULE_THIN` (solid tissue inside the lung field that the opening removed) or
    :data:`NODULE_NONE` (uint8). ``detector``: which lung field (see
    :data:`NODULE_DETECTORS`)."""
    from scipy import ndimage

    _check_detector(detector)
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = ndimage.generate_binary_structure(2, 1)  # in-plane only: slices stay apart
    lung = hu < -500
    if detector == 1:
        field = fill_holes_per_slice(lung)  # what the lung surrounds
    else:
        inside = lung & fill_holes_per_slice(~lung)  # air inside the body
        field = fill_holes_per_slice(
            ndimage.binary_closing(inside, _disk(NODULE_FIELD_CLOSING)) | inside)
    solid = (hu > NODULE_HU[0]) & (hu < NODULE_HU[1]) & field
    opened = ndimage.binary_opening(solid, plane)
    codes = np.where(lung, NODULE_LUNG, NODULE_NONE).astype(np.uint8)
    codes[solid] = NODULE_THIN
    codes[opened] = NODULE_SOLID
    return codes


def pack_codes(codes: np.ndarray) -> bytes:
    """One slice's codes ``(H, W)`` as bytes (:func:`unpack_codes` reads them back)."""
    h, w = codes.shape
    return h.to_bytes(2, "little") + w.to_bytes(2, "little") + zlib.compress(
        np.ascontiguousarray(codes, dtype=np.uint8).tobytes(), 1)


def unpack_codes(data: bytes) -> np.ndarray:
    h, w = int.from_bytes(data[:2], "little"), int.from_bytes(data[2:4], "little")
    return np.frombuffer(zlib.decompress(data[4:]), dtype=np.uint8).reshape(h, w)


def _compact(codes: np.ndarray, labels: np.ndarray, k: int, box: tuple[slice, ...],
             voxels: int, spacing: tuple[float, float, float]) -> bool:
    """Whether component ``k`` of ``labels`` (``voxels`` voxels in ``box``) is a compact
    solid component inside aerated lung (:data:`NODULE_HU`)."""
    S, H, W = codes.shape
    dz, dy, dx = spacing
    ez, ey, ex = ((b.stop - b.start) * d for b, d in zip(box, (dz, dy, dx)))
    if max(ez, ey, ex) > NODULE_MAX_MM or min(ey, ex) < NODULE_MIN_MM:
        return False
    if max(ez, ey, ex) > NODULE_ASPECT * max(min(ez, ey, ex), dz, 5.0):
        return False
    if voxels * dz * dy * dx < NODULE_FILL * np.pi / 6 * max(ez, NODULE_MIN_MM) * ey * ex:
        return False
    grown = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, m)) for b, m in zip(box, (S, H, W)))
    around = labels[grown] != k
    return bool((codes[grown][around] == NODULE_LUNG).mean() >= NODULE_LUNG_SHARE)


def _candidate_features(codes: np.ndarray, labels: np.ndarray, k: int, box: tuple[slice, ...],
                        voxels: int, spacing: tuple[float, float, float], near_ratio: float,
                        cored: bool) -> list[float]:
    """:data:`NODULE_FEATURES` of component ``k`` of ``labels`` (``voxels`` voxels in ``box``)."""
    S, H, W = codes.shape
    dz, dy, dx = spacing
    mask = labels[box] == k
    ez, ey, ex = ((b.stop - b.start) * d for b, d in zip(box, (dz, dy, dx)))
    volume = voxels * dz * dy * dx
    grown = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, m)) for b, m in zip(box, (S, H, W)))
    around = codes[grown][labels[grown] != k]
    return [(6 * volume / np.pi) ** (1 / 3), ez, ey, ex,
            max(ez, ey, ex) / max(min(ez, ey, ex), 1e-3),
            volume / (np.pi / 6 * max(ez, 1.0) * ey * ex),
            float((around == NODULE_LUNG).mean()), float((around == NODULE_NONE).mean()),
            float((codes[box][mask] == NODULE_THIN).mean()), near_ratio, float(cored),
            float(mask.sum(axis=(1, 2)).max()) * dy * dx, float(box[0].stop - box[0].start),
            dz, dy, float(voxels)]


def nodule_candidates(codes: np.ndarray, spacing_mm: tuple[float, float, float],
                      ) -> list[tuple[tuple[slice, ...], float, list[float]]]:
    """Detector 3's candidates in one view's stacked :func:`slice_codes`: per component its
    bounding box ``(z, y, x)``, volume (mm^3) and :data:`NODULE_FEATURES` (see
    :data:`NODULE_CANDIDATE_MAX_MM`)."""
    from scipy import ndimage

    spacing = tuple(abs(float(v)) for v in spacing_mm)
    full = ndimage.generate_binary_structure(3, 3)
    every = (codes == NODULE_SOLID) | (codes == NODULE_THIN)
    opened = codes == NODULE_SOLID
    out = []
    labels, n = ndimage.label(every, full)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    near, _ = ndimage.label(ndimage.binary_dilation(every, full), full)
    near_voxels = np.bincount(near[every], minlength=int(near.max()) + 1)
    taken = np.zeros_like(every)
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or max((b.stop - b.start) * d for b, d in zip(box, spacing)) > (
                NODULE_CANDIDATE_MAX_MM):
            continue
        mask = labels[box] == k
        taken[box] |= mask
        ratio = near_voxels[near[box][mask][0]] / sizes[k]
        out.append((box, float(sizes[k]) * voxel_mm3, _candidate_features(
            codes, labels, k, box, int(sizes[k]), spacing, float(ratio), False)))
    core = ndimage.binary_erosion(opened, np.ones((1, 3, 3), dtype=bool))
    labels, n = ndimage.label(opened, full)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or max((b.stop - b.start) * d for b, d in zip(box, spacing)) > (
                NODULE_CANDIDATE_MAX_MM):
            continue
        mask = labels[box] == k
        if taken[box][mask].any():
            continue
        out.append((box, float(sizes[k]) * voxel_mm3, _candidate_features(
            codes, labels, k, box, int(sizes[k]), spacing, 1.0, bool(core[box][mask].any()))))
    return out


def nodule_probability(features: np.ndarray, scorer: dict[str, np.ndarray] | None = None
                       ) -> np.ndarray:
    """The probability that each candidate (rows of :data:`NODULE_FEATURES`) is a nodule:
    detector 3's logistic regression (:data:`NODULE_SCORER`), or given ``scorer`` (arrays
    :data:`NODULE_MLP_KEYS`, e.g. :func:`nodule_mlp`) detector 4's MLP."""
    use = NODULE_SCORER if scorer is None else scorer
    x = (np.log1p(np.abs(np.asarray(features, dtype=np.float64))) - use["mean"]) / use["std"]
    if scorer is None:
        logit = x @ use["weight"] + use["bias"]
    else:
        hidden = np.maximum(x @ scorer["w1"].T + scorer["b1"], 0.0)
        logit = hidden @ scorer["w2"].reshape(-1) + scorer["b2"].reshape(())
    return 1.0 / (1.0 + np.exp(-logit))


def _nodule_components(codes: np.ndarray, spacing_mm: tuple[float, float, float],
                       thin: bool = False, detector: int = 1,
                       scorer: dict[str, np.ndarray] | None = None,
                       ) -> Iterator[tuple[tuple[slice, ...], float, float]]:
    """The compact solid components inside the lung field of one view's stacked
    :func:`slice_codes`: per component its bounding box ``(z, y, x)``, volume (mm^3) and rank
    (what the cue carries and the sites are sorted by: the volume, or with detectors 3 and 4 the
    probability of a nodule). ``detector`` 1: the components of the opened solid tissue
    (``thin``: of all of it); 2 and 3: see :data:`NODULE_DETECTORS` (``thin`` adds nothing:
    they read all solid tissue); 4: detector 3's candidates scored by ``scorer`` (default: the
    shipped :func:`nodule_mlp`)."""
    from scipy import ndimage

    if detector in (3, 4):
        if detector == 4 and scorer is None:
            scorer = nodule_mlp()
        found = nodule_candidates(codes, spacing_mm)
        if found:
            p = nodule_probability(np.array([f for _, _, f in found]),
                                   scorer if detector == 4 else None)
            for (box, volume, _), prob in zip(found, p):
                yield box, volume, float(prob)
        return
    spacing = tuple(abs(float(v)) for v in spacing_mm)
    voxel_mm3 = spacing[0] * spacing[1] * spacing[2]
    full = ndimage.generate_binary_structure(3, 3)
    every = (codes == NODULE_SOLID) | (codes == NODULE_THIN)
    opened = codes == NODULE_SOLID
    if detector == 1:
        labels, n = ndimage.label(every if thin else opened, full)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is not None and _compact(codes, labels, k, box, sizes[k], spacing):
                yield box, float(sizes[k]) * voxel_mm3, float(sizes[k]) * voxel_mm3
        return
    # isolated components of all solid tissue: alone within one voxel
    labels, n = ndimage.label(every, full)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    near, _ = ndimage.label(ndimage.binary_dilation(every, full), full)
    near_voxels = np.bincount(near[every], minlength=int(near.max()) + 1)
    taken = np.zeros_like(every)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == k
        if near_voxels[near[box][mask][0]] > NODULE_PART_OF * sizes[k]:
            continue  # a dot of a vessel
        if _compact(codes, labels, k, box, sizes[k], spacing):
            taken[box] |= mask
            yield box, float(sizes[k]) * voxel_mm3, float(sizes[k]) * voxel_mm3
    # cored components of the opened tissue: a larger nodule touching a vessel
    core = ndimage.binary_erosion(opened, np.ones((1, 3, 3), dtype=bool))
    labels, n = ndimage.label(opened, full)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == k
        if not core[box][mask].any() or taken[box][mask].any():
            continue
        if _compact(codes, labels, k, box, sizes[k], spacing):
            yield box, float(sizes[k]) * voxel_mm3, float(sizes[k]) * voxel_mm3


Component = tuple[tuple[slice, ...], float, float]  # (box, volume mm^3, rank)


def nodule_components(codes: np.ndarray, spacing_mm: tuple[float, float, float],
                      thin: bool = False, detector: int = 1,
                      scorer: dict[str, np.ndarray] | None = None) -> list[Component]:
    """:func:`_nodule_components` as a list, for :func:`nodule_cues` and :func:`nodule_sites`
    to share one search over a view (detector 3 scores every candidate: ~0.3 s a view)."""
    return list(_nodule_components(codes, spacing_mm, thin, detector, scorer))


def nodule_cues(codes: np.ndarray, spacing_mm: tuple[float, float, float],
                grid: int, thin: bool = False, detector: int = 1,
                components: list[Component] | None = None) -> np.ndarray:
    """``(S, grid*grid)`` float32 from one view's stacked :func:`slice_codes` and its voxel
    size ``(dz, dy, dx)`` in mm: per slice and cell, the largest equivalent diameter (cm) of
    the compact solid components (see :data:`NODULE_HU`) that the slice cuts and whose
    centre lies in the cell (with ``detector`` 3 the highest probability of a nodule among its
    candidates); 0 where none. ``thin``: the solid tissue the opening removed counts as well
    (:data:`ENHANCED_PHASES`). ``components``: :func:`nodule_components` of the same
    arguments, when already found."""
    S, H, W = codes.shape
    out = np.zeros((S, grid * grid), dtype=np.float32)
    if components is None:
        components = nodule_components(codes, spacing_mm, thin, detector)
    for box, volume, rank in components:
        row = min(int((box[1].start + box[1].stop) / 2 * grid // H), grid - 1)
        col = min(int((box[2].start + box[2].stop) / 2 * grid // W), grid - 1)
        cell = row * grid + col
        value = rank if detector >= 3 else (6 * volume / np.pi) ** (1 / 3) / 10
        out[box[0], cell] = np.maximum(out[box[0], cell], value)
    return out


# what :func:`nodule_sites` says of each component (one row each)
SITE_COLUMNS = ("diameter_mm", "level", "side", "front")
SITES_PER_VIEW = 2


def nodule_sites(codes: np.ndarray, z_mm: np.ndarray, spacing_mm: tuple[float, float, float],
                 top: int = 2, detector: int = 1,
                 components: list[Component] | None = None) -> np.ndarray:
    """``(K <= top, 4)`` float32, the largest compact solid components of an axial view
    (:func:`nodule_cues`' components; with ``detector`` 3 the most probable nodules, from
    :data:`NODULE_SITE_MIN_P`) placed against the lungs, in that order (see
    :data:`SITE_COLUMNS`): equivalent diameter (mm); ``level``, the centre's height between the
    lowest (0) and highest (1) slice with aerated lung; ``side``, its column against the lungs'
    extent in columns (-1 first column of lung, +1 last: the patient's right and left on a
    standard axial image); ``front``, its row likewise (-1 first row: anterior). The lungs are
    the air the body surrounds, so the air around the patient does not count.
    ``components``: :func:`nodule_components` (not ``thin``), when already found."""
    S, H, W = codes.shape
    if components is None:
        components = nodule_components(codes, spacing_mm, detector=detector)
    found = sorted((c for c in components if c[2] >= site_min_p(detector)),
                   key=lambda c: -c[2])[:top]
    if not found:
        return np.zeros((0, len(SITE_COLUMNS)), dtype=np.float32)
    air = codes == NODULE_LUNG
    lung = air & fill_holes_per_slice(~air)  # per slice: air inside the body
    per_slice = lung.sum(axis=(1, 2))
    z = np.asarray(z_mm, dtype=np.float64)
    rows_with, cols_with = lung.any(axis=(0, 2)), lung.any(axis=(0, 1))
    if per_slice.max() == 0:
        z_lo, z_hi, r_lo, r_hi, c_lo, c_hi = z.min(), z.max(), 0, H - 1, 0, W - 1
    else:
        aerated = z[per_slice >= 0.05 * per_slice.max()]
        z_lo, z_hi = aerated.min(), aerated.max()
        r_lo, r_hi = np.flatnonzero(rows_with)[[0, -1]]
        c_lo, c_hi = np.flatnonzero(cols_with)[[0, -1]]
    out = []
    for box, volume, _ in found:
        zc = float(z[box[0]].mean())
        rc, cc = (box[1].start + box[1].stop - 1) / 2, (box[2].start + box[2].stop - 1) / 2
        out.append([(6 * volume / np.pi) ** (1 / 3),
                    (zc - z_lo) / max(z_hi - z_lo, 1e-6),
                    2 * (cc - c_lo) / max(c_hi - c_lo, 1) - 1,
                    2 * (rc - r_lo) / max(r_hi - r_lo, 1) - 1])
    return np.asarray(out, dtype=np.float32)


def _gauss(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(S, 1, H, W)`` with edge replication."""
    H, W = x.shape[-2:]
    return _gauss_matrix(H, sigma, x.device) @ x @ _gauss_matrix(W, sigma, x.device).T


class PyramidSliceEncoder(nn.Module):
    """A slice encoder in two parts, for CPU budgets.

    ``lower`` (fixed, no parameters, cacheable): per slice, the share of pixels in each HU bin
    within each cell of a ``grid x grid`` layout, at full resolution and after 2x2 and 4x4
    averaging. Counting keeps a small spot: a 6 mm nodule is a few pixels in a soft-tissue bin of
    a lung cell, which a mean over a 16-px patch loses; averaging tells a blob, which survives
    it, from a vessel or a septal line, which does not. ``upper`` (trained with the finding
    loss): an MLP from those shares to the embedding. MR is binned uniformly on the view's
    percentile-scaled intensities.

    ``detail`` (the demo since issue 13's second checkpoint): the slice is first resampled to a
    fixed ``matrix`` (so a filter means the same millimetres at any matrix), the HU bins split
    calcium from bone, and per cell and material the share of pixels whose difference-of-
    Gaussians response at 1, 2 and 3 pixels falls in each band is added: a bright spot (nodule,
    calcified plaque, thickened bronchial wall, fibrotic band) or a dark one (filling defect,
    airway lumen) of about that size shows even where its material is common in the cell.
    Chosen by the linear probe (300/150 phantoms of training seeds): macro AUROC 0.815 for the
    HU bins alone, 0.891 with both additions.

    ``lesions`` (needs ``detail``; CT only, zeros for MR) adds per cell two lesion cues the
    shares miss because a lesion's pixels are few next to the anatomy's: the strongest
    bright-spot response among pixels surrounded by aerated lung in all eight directions (a
    nodule, which a vessel or the end of a bronchus is not), and the share of soft-tissue
    pixels with enhanced blood on both sides along a line 2-3 pixels away (an embolus filling a
    pulmonary artery). Probe (same phantoms, per study the maximum over slices): embolism
    AUROC 0.98 (studies with an arterial phase) from the gap share of the central cell alone,
    nodule 0.74 from the isolated spots (every earlier feature set: 0.57-0.71 for both). Fed
    through the MLP with the rest they were lost (it over-fitted; the head reached 0.68 / 0.65,
    README "Lesion cues"), so they bypass it: the embedding's last :attr:`cue_dim`
    values are the standardised cues themselves (``asinh``-compressed; the MLP writes the
    others), which the Z-former sees with the rest and the finding head also reads as a maximum
    over slices (:class:`models.findings.FindingHead`).

    ``nodules`` (needs ``lesions``) adds per cell one more cue that a single slice cannot give:
    the size of a compact solid component inside the lung field, found in 3D over the whole
    view (:func:`nodule_cues`), on every slice it cuts. A vessel cut across is as round and as
    large as a 6 mm nodule on one slice; in 3D it is long. The per-slice part
    (:meth:`codes`, one byte per pixel) is what streaming keeps with each slice's embedding;
    the view fills the cue in (:meth:`lower_view`, :meth:`volume_embedding`). Probe (150
    phantoms of a seed used for nothing else, per study the largest component): nodule AUROC
    0.85, the isolated spots 0.74.

    ``enhanced_nodules`` (needs ``nodules``) adds a second nodule cue per cell, from the
    solid tissue before the opening, in views of an enhanced phase only (zero in the others;
    see :data:`ENHANCED_PHASES`): there the vessels are bright, so a component of soft-tissue
    density in the lung is not a vessel, and a 6 mm nodule the opening erases stays.

    ``nodule_detector``: how the nodule cue and the sites find components (see
    :data:`NODULE_DETECTORS`; a checkpoint keeps the one it was trained with).

    ``cue_scale``: how :meth:`fit_standardisation` scales the lesion cues, per ``"cell"`` (the
    demos so far) or one scale per cue ``"type"`` over its cells, or per type for the nodule
    cues only (``"nodules"``; the others per cell).

    ``dropout``: on the MLP's hidden layer while training (the findings stage over-fitted
    1,200 studies within ~1,250 steps without it).
    """

    raw_input = True  # encode_slices hands it the view's own values, not windowed channels
    cue_dim = 0  # trailing embedding values that are lesion cues (``lesions``)

    def __init__(self, embed_dim: int, grid: int = 3, hidden: int = 256,
                 detail: bool = False, matrix: int = 128, lesions: bool = False,
                 dropout: float = 0.0, nodules: bool = False,
                 enhanced_nodules: bool = False, nodule_detector: int = 1,
                 cue_scale: str = "cell") -> None:
        super().__init__()
        if lesions and not detail:
            raise ValueError("Invalid 'pyramid_lesions' - needs 'pyramid_detail'")
        if nodules and not lesions:
            raise ValueError("Invalid 'pyramid_nodules' - needs 'pyramid_lesions'")
        if enhanced_nodules and not nodules:
            raise ValueError("Invalid 'pyramid_enhanced_nodules' - needs 'pyramid_nodules'")
        self.lesions = lesions
        self.nodules = nodules
        self.enhanced_nodules = enhanced_nodules
        _check_detector(nodule_detector)
        if enhanced_nodules and nodule_detector != 1:
            raise ValueError("Invalid 'pyramid_enhanced_nodules' - detector 2 already reads "
                             "the solid tissue before the opening in every view")
        self.nodule_detector = nodule_detector
        if nodule_detector == 4:  # the scorer travels with the checkpoint (NODULE_MLP_FILE)
            for key, value in nodule_mlp().items():
                self.register_buffer(f"nodule_mlp_{key}", torch.from_numpy(value.copy()))
        if cue_scale not in ("cell", "type", "nodules"):
            raise ValueError(f"Invalid 'pyramid_cue_scale' {cue_scale!r} - 'cell', 'type' or "
                             "'nodules'")
        self.cue_scale = cue_scale
        # trailing cues a view fills in once whole (lower_view): the nodule cue types' cells
        self.view_cue_dim = (int(nodules) + int(enhanced_nodules)) * grid * grid
        self.grid = grid
        self.scales = (1, 2, 4)
        self.detail = detail
        self.matrix = matrix
        hu_edges = DETAIL_HU_EDGES if detail else HU_EDGES
        self.register_buffer("edges", torch.tensor(hu_edges[1:]), persistent=False)
        self.bins = len(hu_edges)
        self.in_dim = len(self.scales) * grid * grid * self.bins
        if detail:
            self.in_dim += len(BLOB_SIGMAS) * grid * grid * (len(MATERIAL_EDGES) + 1) * (
                len(BLOB_EDGES))
            if lesions:
                self.cue_dim = (len(ISOLATED_SPOTS) + len(GAP_DISTANCES)) * grid * grid + (
                    self.view_cue_dim)
                self.in_dim += self.cue_dim
                if embed_dim <= self.cue_dim:
                    raise ValueError(f"Invalid 'vision_hidden' {embed_dim} - must exceed the "
                                     f"{self.cue_dim} lesion cues")
            # per-feature standardisation, fitted once on the training data's lower features
            # (fit_standardisation) and saved with the weights: the shares differ little
            # between studies next to their offsets, and unscaled the head sat at the prior
            # loss for 1,000 steps (measured)
            self.register_buffer("feature_mean", torch.zeros(self.in_dim))
            self.register_buffer("feature_std", torch.ones(self.in_dim))
        self.upper = nn.Sequential(nn.Linear(self.in_dim - self.cue_dim, hidden), nn.GELU(),
                                   nn.Dropout(dropout), nn.Linear(hidden, embed_dim - self.cue_dim))
        self.embed_dim = embed_dim

    def _cells(self, H: int, W: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pixel's cell index ``(H*W,)`` and each cell's pixel count ``(grid*grid,)``."""
        rows = torch.clamp(torch.arange(H, device=device) * self.grid // H, max=self.grid - 1)
        cols = torch.clamp(torch.arange(W, device=device) * self.grid // W, max=self.grid - 1)
        cell = (rows[:, None] * self.grid + cols[None, :]).flatten()
        return cell, torch.bincount(cell, minlength=self.grid * self.grid).float()

    def _shares(self, codes: torch.Tensor, cell: torch.Tensor, per_cell: torch.Tensor,
                n: int) -> torch.Tensor:
        """``(S, H*W)`` codes in ``[0, n)`` -> ``(S, cells, n)`` share of each cell's pixels."""
        S = codes.shape[0]
        index = cell[None, :] * n + codes
        counts = torch.zeros(S, self.grid * self.grid * n, device=codes.device)
        counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
        return counts.view(S, self.grid * self.grid, n) / per_cell[None, :, None]

    @torch.no_grad()
    def lower(self, values: torch.Tensor, modality: str = "CT") -> torch.Tensor:
        """``(S, H, W)`` HU (or MR intensities) -> ``(S, in_dim)`` bin shares."""
        # detail: a fixed pixel grid, so filter scales mean the same millimetres on a 512 matrix
        x = self._resampled(values) if self.detail else values.float()
        if modality == "CT":
            edges = self.edges.to(x.device)
        else:
            lo, hi = torch.quantile(x.flatten()[:: max(1, x.numel() // 1_000_000)],
                                    torch.tensor([0.005, 0.995], device=x.device))
            x = ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
            edges = torch.linspace(0, 1, self.bins + 1, device=x.device)[1:-1]
        S = x.shape[0]
        out = []
        for k in self.scales:
            y = x if k == 1 else nn.functional.avg_pool2d(x[:, None], k)[:, 0]
            cell, per_cell = self._cells(*y.shape[-2:], x.device)
            b = torch.bucketize(y.reshape(S, -1), edges)  # (S, H*W) in [0, bins)
            out.append(self._shares(b, cell, per_cell, self.bins).reshape(S, -1))
        if self.detail:
            out.append(self._blobs(x if modality == "CT" else x * 1000.0))
        if self.lesions:
            n = (len(ISOLATED_SPOTS) + len(GAP_DISTANCES)) * self.grid * self.grid
            out.append(self._lesions(x) if modality == "CT" else x.new_zeros(S, n))
        if self.nodules:  # filled in by the view (lower_view), zero on a slice alone
            out.append(x.new_zeros(S, self.view_cue_dim))
        return torch.cat(out, dim=1)  # (S, in_dim)

    def _resampled(self, values: torch.Tensor) -> torch.Tensor:
        x = values.float()
        if x.shape[-2:] != (self.matrix, self.matrix):
            x = nn.functional.interpolate(x[:, None], size=(self.matrix, self.matrix),
                                          mode="bilinear", antialias=True,
                                          align_corners=False)[:, 0]
        return x

    @torch.no_grad()
    def codes(self, values: torch.Tensor, modality: str = "CT") -> np.ndarray:
        """Per-slice :func:`slice_codes` ``(S, matrix, matrix)`` (all "none" for MR)."""
        if modality != "CT":
            return np.zeros((values.shape[0], self.matrix, self.matrix), dtype=np.uint8)
        return slice_codes(self._resampled(values).cpu().numpy(), self.nodule_detector)

    def grid_spacing(self, shape: tuple[int, int], pixel_mm: tuple[float, float],
                     z_mm: np.ndarray) -> tuple[float, float, float]:
        """Voxel size ``(dz, dy, dx)`` in mm of a view resampled to the fixed matrix."""
        z = np.asarray(z_mm, dtype=np.float64)
        dy = float(pixel_mm[0]) * shape[0] / self.matrix
        dx = float(pixel_mm[1]) * shape[1] / self.matrix
        dz = float(np.median(np.abs(np.diff(z)))) if len(z) > 1 else dy
        return (dz if dz > 0 else dy), dy, dx

    def nodule_scorer(self) -> dict[str, np.ndarray] | None:
        """Detector 4's scorer as this encoder keeps it (None with the other detectors)."""
        if self.nodule_detector != 4:
            return None
        return {k: getattr(self, f"nodule_mlp_{k}").detach().cpu().double().numpy()
                for k in NODULE_MLP_KEYS}

    def find_nodules(self, codes: np.ndarray, spacing_mm: tuple[float, float, float]
                     ) -> list[Component]:
        """:func:`nodule_components` of a view's stacked :meth:`codes` with this encoder's
        detector (and scorer)."""
        return nodule_components(codes, spacing_mm, detector=self.nodule_detector,
                                 scorer=self.nodule_scorer())

    def view_cues(self, codes: np.ndarray, spacing_mm: tuple[float, float, float],
                  phase: str = "unknown", components: list[Component] | None = None
                  ) -> np.ndarray:
        """``(S, view_cue_dim)`` nodule cues of a whole view from its stacked :meth:`codes`:
        the opened solid components (``components``, when already found), then with
        ``enhanced_nodules`` the unopened ones where ``phase`` is enhanced (zero otherwise)."""
        if components is None:
            components = self.find_nodules(codes, spacing_mm)
        cues = [nodule_cues(codes, spacing_mm, self.grid, detector=self.nodule_detector,
                            components=components)]
        if self.enhanced_nodules:
            cues.append(nodule_cues(codes, spacing_mm, self.grid, True, self.nodule_detector)
                        if phase in ENHANCED_PHASES else np.zeros_like(cues[0]))
        return np.concatenate(cues, axis=1)

    def view_sites(self, codes: np.ndarray, z_mm: np.ndarray,
                   spacing_mm: tuple[float, float, float], plane: str,
                   components: list[Component] | None = None) -> np.ndarray:
        """:func:`nodule_sites` of an axial view from its stacked :meth:`codes` (none for the
        other planes, whose columns need not run from the patient's right to left, or
        without ``nodules``); ``components`` as :meth:`view_cues`."""
        if not self.nodules or plane != "axial":
            return np.zeros((0, len(SITE_COLUMNS)), dtype=np.float32)
        if components is None:
            components = self.find_nodules(codes, spacing_mm)
        return nodule_sites(codes, z_mm, spacing_mm, SITES_PER_VIEW, self.nodule_detector,
                            components)

    @torch.no_grad()
    def lower_view(self, pixels: np.ndarray, modality: str, z_mm: np.ndarray,
                   pixel_mm: tuple[float, float], chunk: int = 64,
                   device: torch.device | str = "cpu", phase: str = "unknown",
                   plane: str | None = None) -> Any:
        """:meth:`lower` of a whole view ``(S, H, W)`` of ``phase``, ``chunk`` slices at a
        time on ``device``, with the view's nodule cues filled in (``nodules``). Given the
        view's ``plane``, returns ``(features, sites)`` with its :meth:`view_sites`."""
        parts = [torch.as_tensor(pixels[i:i + chunk], device=device)
                 for i in range(0, len(pixels), chunk)]
        feats = torch.cat([self.lower(p, modality) for p in parts])
        sites = np.zeros((0, len(SITE_COLUMNS)), dtype=np.float32)
        if self.nodules:
            codes = np.concatenate([self.codes(p, modality) for p in parts])
            spacing = self.grid_spacing(pixels.shape[-2:], pixel_mm, z_mm)
            found = self.find_nodules(codes, spacing)
            feats[:, -self.view_cue_dim:] = torch.from_numpy(
                self.view_cues(codes, spacing, phase, found)).to(feats)
            if plane is not None:
                sites = self.view_sites(codes, z_mm, spacing, plane, found)
        return feats if plane is None else (feats, torch.from_numpy(sites))

    def volume_embedding(self, cues: torch.Tensor) -> torch.Tensor:
        """The embedding's last :attr:`view_cue_dim` values for ``(S, view_cue_dim)`` nodule
        cues (what :meth:`forward` makes of them), so a view whose slices were embedded one by
        one gets them once it is whole."""
        n = self.view_cue_dim
        # the very operations of forward on a full-width row (not on the n columns alone): a
        # vectorised asinh differs from the scalar one in the last bit, and that bit flipped a
        # near-tie in a draft between a streamed and a whole view (measured)
        feats = cues.new_zeros(cues.shape[0], self.in_dim, dtype=torch.float32)
        feats[:, -n:] = cues.float()
        z = feats.clamp_min(0).sqrt()
        z = (z - self.feature_mean.to(z.dtype)) / self.feature_std.to(z.dtype)
        return torch.asinh(z[:, -self.cue_dim:])[:, -n:]

    def _cell_reduce(self, x: torch.Tensor, reduce: str) -> torch.Tensor:
        """``(S, H, W)`` -> ``(S, cells)``: per cell the maximum or the mean."""
        S, H, W = x.shape
        rows = [slice(i * H // self.grid, (i + 1) * H // self.grid) for i in range(self.grid)]
        cols = [slice(j * W // self.grid, (j + 1) * W // self.grid) for j in range(self.grid)]
        cells = [x[:, r, c] for r in rows for c in cols]
        return torch.stack([c.amax(dim=(1, 2)) if reduce == "max" else c.mean(dim=(1, 2))
                            for c in cells], dim=1)

    def _lesions(self, hu: torch.Tensor) -> torch.Tensor:
        """Per cell: the strongest isolated bright spot in lung (HU / 1000) at each filter
        size, and the share of soft-tissue gaps between contrast at each distance."""
        lung = (hu < -500).float()
        contrast = (hu > 200).float()
        soft = ((hu > -50) & (hu < 150)).float()
        bright = hu.clamp(-1000.0, 100.0)[:, None]  # enhanced vessels count as soft tissue
        out = []
        for sigma, d in ISOLATED_SPOTS:
            e = round(d / 2 ** 0.5)
            around = functools.reduce(torch.minimum, _shifts(lung, [
                (d, 0), (-d, 0), (0, d), (0, -d), (e, e), (-e, -e), (e, -e), (-e, e)]))
            spot = (_gauss(bright, sigma) - _gauss(bright, 1.6 * sigma))[:, 0]
            out.append(self._cell_reduce(spot * around, "max").clamp_min(0) / 1000.0)
        for d in GAP_DISTANCES:
            axes = [(1, 0), (0, 1), (1, 1), (1, -1)]
            ahead = _shifts(contrast, [(d * a, d * b) for a, b in axes])
            behind = _shifts(contrast, [(-d * a, -d * b) for a, b in axes])
            between = functools.reduce(torch.maximum, map(torch.minimum, ahead, behind))
            out.append(self._cell_reduce(between * soft, "mean"))
        return torch.cat(out, dim=1)

    def _blobs(self, hu: torch.Tensor) -> torch.Tensor:
        """Per cell, the share of pixels of each material whose difference-of-Gaussians
        response (bright or dark spot of about the filter's size) falls in each band."""
        S = hu.shape[0]
        x = hu.clamp(-1000.0, 1000.0)[:, None]  # metal does not ring over its neighbourhood
        material = torch.bucketize(x.reshape(S, -1), MATERIAL_EDGES.to(x.device))
        nm, nb = len(MATERIAL_EDGES) + 1, len(BLOB_EDGES) + 1
        cell, per_cell = self._cells(*x.shape[-2:], x.device)
        out = []
        for sigma in BLOB_SIGMAS:
            # sigma >= 2 pixels on a 2x averaged image (same filter, a quarter of the work)
            step = 2 if sigma >= 2 else 1
            y = nn.functional.avg_pool2d(x, step) if step > 1 else x
            s = sigma / step
            dog = _gauss(y, s) - _gauss(y, 1.6 * s)  # > 0: a bright spot
            if step > 1:
                dog = nn.functional.interpolate(dog, size=x.shape[-2:], mode="nearest")
            band = torch.bucketize(dog.reshape(S, -1), BLOB_EDGES.to(x.device))
            shares = self._shares(material * nb + band, cell, per_cell, nm * nb)
            shares = shares.view(S, -1, nm, nb)
            middle = len(BLOB_EDGES) // 2  # the flat band carries nothing the HU bins lack
            out.append(torch.cat([shares[..., :middle], shares[..., middle + 1:]], -1)
                       .reshape(S, -1))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def fit_standardisation(self, features: torch.Tensor, floor: float = 0.01) -> None:
        """Set the standardisation from ``(N, in_dim)`` lower features of training slices
        (a spread below ``floor`` counts as ``floor``, so a nearly constant share is not
        blown up). With ``cue_scale = "type"`` every cell of a lesion cue type shares one mean
        and spread (``"nodules"``: only the nodule cues' cells), so the cue's maximum over the
        cells (the finding head's
        ``finding_cue_cells``) compares sizes, not rarities: per cell, a corner cell where
        training saw no component has the floor as its spread and a 6 mm component there
        outranked an 18 mm nodule in the central cell (spreads 0.01-0.16; measured with
        detector 2 and per-cell scaling, the nodule cue path reached validation AUROC 0.76
        where the largest component's size alone separates at 0.87)."""
        z = features.float().clamp_min(0).sqrt()
        mean, std = z.mean(0), z.std(0)
        n = {"cell": 0, "type": self.cue_dim, "nodules": self.view_cue_dim}[self.cue_scale]
        if n:
            cells = self.grid * self.grid
            cues = z[:, -n:].reshape(len(z), -1, cells)  # (N, types, cells)
            mean[-n:] = cues.mean(dim=(0, 2)).repeat_interleave(cells)
            std[-n:] = cues.transpose(0, 1).reshape(cues.shape[1], -1).std(
                dim=1).repeat_interleave(cells)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(floor))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # square-root shares: a few pixels of a rare material still move the input
        z = features.clamp_min(0).sqrt()
        if self.detail:
            z = (z - self.feature_mean.to(z.dtype)) / self.feature_std.to(z.dtype)
        if not self.cue_dim:
            return self.upper(z)
        rest, cues = z[:, :-self.cue_dim], z[:, -self.cue_dim:]
        return torch.cat([self.upper(rest), torch.asinh(cues)], dim=1)
