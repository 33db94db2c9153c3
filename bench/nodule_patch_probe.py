"""Would the voxels around a nodule candidate tell a small nodule from a vessel fragment better
than detector 3's shape numbers? (issue 13, the next step for small nodules)

    .venv/bin/python bench/nodule_patch_probe.py [--fit-studies 100] [--report-studies 80]
        [--cnn-steps 3000]

Nodule phantoms (every one with one or two nodules) of the detector's seed 73 to fit, of seed
74 to report, as ``bench/fit_nodule_scorer.py --nodules-only``: every candidate of
``nodule_candidates`` in the axial views, labelled by the nodules' positions (a signal real
data sets lack). Per candidate the HU of a cube of :data:`GRID` points :data:`STEP_MM` apart
around its box's centre (linear interpolation, so every slice thickness gives the same grid)
and its :data:`models.cnn.NODULE_FEATURES`. Four class-balanced classifiers (Adam, 1,500
full-batch steps, torch seed 0) and a small 3D CNN on the cube beside the shape numbers
(:class:`CubeNet`: balanced batches of 128, random flips and in-plane transposes,
``--cnn-steps``) are reported by candidate AUROC, by the AUROC of small (<= 6 mm) nodules'
candidates against those of no nodule, and by how many small nodules' candidates score above
the one that lets through one false candidate per reported study (a site needs about that).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fit_nodule_scorer import candidate_hits, train_balanced  # bench/, the script's folder
from models.cnn import nodule_candidates, slice_codes
from models.phantom import iter_cases
from models.probe import auroc

FIT_SEED, REPORT_SEED = 73, 74
GRID, STEP_MM = 9, 1.5  # a 13.5 mm cube: a 6 mm nodule and what lies around it


def collect(count: int, seed: int) -> tuple[np.ndarray, ...]:
    """(voxels, log1p shape features, is a nodule, is a small nodule) per candidate."""
    from scipy import ndimage

    voxels, features, hits, small = [], [], [], []
    start = time.time()
    offsets = (np.arange(GRID) - (GRID - 1) / 2) * STEP_MM
    for i, case in enumerate(iter_cases(count, seed, force={"Lung nodule": True})):
        for view in case.views:
            if view.plane != "axial":
                continue
            hu = view.pixels.astype(np.float32)
            codes = slice_codes(view.pixels, detector=3)
            spacing = (float(np.median(np.diff(view.z_mm))), *view.pixel_spacing_mm)
            _, H, W = codes.shape
            for box, _, feats in nodule_candidates(codes, spacing):
                centre = [(b.start + b.stop - 1) / 2 for b in box]
                grid = np.meshgrid(*(c + offsets / d for c, d in zip(centre, spacing)),
                                   indexing="ij")
                cube = ndimage.map_coordinates(hu, [g.ravel() for g in grid], order=1,
                                               mode="nearest")
                hit, tiny = candidate_hits(box, case.nodules, view.z_mm, spacing, (H, W))
                voxels.append(np.clip(cube, -1000, 400) / 500.0)
                features.append(feats)
                hits.append(hit)
                small.append(tiny)
        if (i + 1) % 25 == 0:
            print(f"  seed {seed}: {i + 1}/{count} studies, {time.time() - start:.0f} s",
                  flush=True)
    return (np.array(voxels, np.float32), np.log1p(np.abs(np.array(features))),
            np.array(hits), np.array(small))


def score(train: np.ndarray, y: np.ndarray, test: np.ndarray, hidden: int) -> np.ndarray:
    torch.manual_seed(0)
    x, t = torch.tensor(train, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    net: torch.nn.Module = (torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(hidden, 1)) if hidden else torch.nn.Linear(x.shape[1], 1))
    train_balanced(net, x, t, lr=3e-3, weight_decay=1e-3)
    with torch.no_grad():
        return torch.sigmoid(net(torch.tensor(test, dtype=torch.float32)).squeeze(1)).numpy()


class CubeNet(torch.nn.Module):
    """Two 3D convolution blocks over the cube, max-pooled, beside the shape numbers."""

    def __init__(self, features: int, width: int = 16) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv3d(1, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv3d(width, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool3d(2),
            torch.nn.Conv3d(width, 2 * width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveMaxPool3d(1), torch.nn.Flatten())
        self.head = torch.nn.Sequential(torch.nn.Linear(2 * width + features, 32),
                                        torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def forward(self, cube: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(cube), features], 1)).squeeze(1)


def score_cnn(vox_a: np.ndarray, feat_a: np.ndarray, y: np.ndarray, vox_b: np.ndarray,
              feat_b: np.ndarray, steps: int) -> np.ndarray:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = CubeNet(feat_a.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    cubes = torch.tensor(vox_a).view(-1, 1, GRID, GRID, GRID)
    feats = torch.tensor(feat_a, dtype=torch.float32)
    target = torch.tensor(y, dtype=torch.float32)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    start = time.time()
    net.train()
    for step in range(1, steps + 1):
        index = np.concatenate([rng.choice(pos, 64), rng.choice(neg, 64)])
        cube = cubes[index]
        for axis in (2, 3, 4):
            if rng.random() < 0.5:
                cube = cube.flip(axis)
        if rng.random() < 0.5:
            cube = cube.transpose(3, 4)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net(cube, feats[index]), target[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"  3D CNN step {step}/{steps}, loss {loss.item():.3f}, "
                  f"{time.time() - start:.0f} s", flush=True)
    net.eval()
    test_cubes = torch.tensor(vox_b).view(-1, 1, GRID, GRID, GRID)
    test_feats = torch.tensor(feat_b, dtype=torch.float32)
    with torch.no_grad():
        return torch.cat([net(test_cubes[i:i + 2048], test_feats[i:i + 2048])
                          for i in range(0, len(vox_b), 2048)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-studies", type=int, default=100)
    parser.add_argument("--report-studies", type=int, default=80)
    parser.add_argument("--cnn-steps", type=int, default=3000)
    args = parser.parse_args()
    vox_a, feat_a, hit_a, _ = collect(args.fit_studies, FIT_SEED)
    vox_b, feat_b, hit_b, small_b = collect(args.report_studies, REPORT_SEED)
    mean, std = feat_a.mean(0), feat_a.std(0) + 1e-6
    feat_a, feat_b = (feat_a - mean) / std, (feat_b - mean) / std
    keep = small_b | ~hit_b
    print(f"fit: {len(hit_a)} candidates ({int(hit_a.sum())} nodules); report: {len(hit_b)} "
          f"({int(hit_b.sum())} nodules, {int(small_b.sum())} small)")
    # the score above which one false candidate per reported study remains
    allowed = args.report_studies

    def line(name: str, p: np.ndarray) -> None:
        cut = np.sort(p[~hit_b])[::-1][min(allowed, int((~hit_b).sum())) - 1]
        print(f"{name:36s} candidate AUROC {auroc(p, hit_b.astype(float)):.3f}, small nodules "
              f"vs no nodule {auroc(p[keep], small_b[keep].astype(float)):.3f}, small above "
              f"{allowed} false: {int((p[small_b] > cut).sum())} of {int(small_b.sum())}",
              flush=True)

    for name, train, test, hidden in (
            ("shape numbers, linear (detector 3)", feat_a, feat_b, 0),
            ("shape numbers, MLP 32", feat_a, feat_b, 32),
            ("voxels, MLP 64", vox_a, vox_b, 64),
            ("voxels + shape numbers, MLP 64", np.hstack([vox_a, feat_a]),
             np.hstack([vox_b, feat_b]), 64)):
        line(name, score(train, hit_a.astype(float), test, hidden))
    line("voxels (3D CNN) + shape numbers",
         score_cnn(vox_a, feat_a, hit_a, vox_b, feat_b, args.cnn_steps))

if __name__ == "__main__":
    main()
