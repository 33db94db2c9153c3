"""Fit nodule detector 3's candidate classifier (``models/cnn.py`` ``NODULE_SCORER``).

    .venv/bin/python bench/fit_nodule_scorer.py [--fit-studies 200] [--report-studies 150]
        [--matrix 128] [--nodules-only]

Detector 2's lung field and solid tissue on phantoms of seed 73 (the detector's seed, never a
training, validation or held-out one); every candidate of ``nodule_candidates`` is labelled a
nodule when its box (one voxel of slack) holds a phantom nodule's centre: this uses the lesion
positions, which real data sets lack (the model card says so). A class-balanced logistic
regression of the log1p features, standardised, is fitted (Adam, 1,500 full-batch steps,
torch seed 0), then reported on phantoms of seed 74 (used for nothing else): candidate AUROC;
per study the best candidate's probability against detector 2's largest component (nodule
studies, small-nodule studies against studies without a nodule) and how often it is a true
nodule; and the candidates of small (<= 6 mm) nodules against those of no nodule: AUROC and how
many reach a site (``NODULE_SITE_MIN_P``). Prints the constants to paste into ``models/cnn.py``.
``--matrix``: draw the phantoms at another in-plane matrix (the demo's data: 128);
``--nodules-only``: every phantom has one or two nodules (more candidates of small ones; the
per-study AUROCs then have no negative studies and are not printed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from models.cnn import NODULE_FEATURES, _nodule_components, nodule_candidates, slice_codes
from models.phantom import iter_cases
from models.probe import auroc

FIT_SEED, REPORT_SEED = 73, 74


def candidate_hits(box: tuple[slice, ...], nodules: list, z_mm: np.ndarray,
                   spacing: tuple[float, float, float], shape: tuple[int, int]
                   ) -> tuple[bool, bool]:
    """Whether a candidate's box (one voxel of slack) holds a phantom nodule's centre, and
    whether it holds a small (<= 6 mm) one's."""
    H, W = shape
    hit = small = False
    for nodule in nodules:
        x, y, z = nodule.center_mm
        index = (int(np.argmin(np.abs(z_mm - z))), int(round(y / spacing[1] + (H - 1) / 2)),
                 int(round(x / spacing[2] + (W - 1) / 2)))
        inside = all(b.start - 1 <= q <= b.stop for b, q in zip(box, index))
        hit |= inside
        small |= inside and nodule.diameter_mm <= 6.0
    return hit, small


def candidates(count: int, seed: int, **options: object) -> list[dict]:
    """Per axial view of ``count`` phantoms (``options``: of :func:`iter_cases`): its
    candidates' features, which are nodules (and which small ones), whether the study has one
    (small: <= 6 mm) and detector 2's largest component."""
    views = []
    start = time.time()
    for i, case in enumerate(iter_cases(count, seed, **options)):
        for view in case.views:
            if view.plane != "axial":
                continue
            codes = slice_codes(view.pixels, detector=3)
            dz = float(np.median(np.diff(view.z_mm)))
            spacing = (dz, *view.pixel_spacing_mm)
            S, H, W = codes.shape
            rows, hits, small = [], [], []
            for box, _, feats in nodule_candidates(codes, spacing):
                hit, tiny = candidate_hits(box, case.nodules, view.z_mm, spacing, (H, W))
                rows.append(feats)
                hits.append(hit)
                small.append(tiny)
            largest = max((v for _, v, _ in _nodule_components(codes, spacing, detector=2)),
                          default=0.0)
            views.append({"study": i, "features": rows, "hits": hits, "small_hits": small,
                          "largest": largest,
                          "nodule": bool(case.labels["Lung nodule"]),
                          "small": any(n.diameter_mm <= 6.0 for n in case.nodules)})
        if (i + 1) % 25 == 0:
            print(f"  seed {seed}: {i + 1}/{count} studies, {time.time() - start:.0f} s",
                  flush=True)
    return views


def train_balanced(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float,
                   weight_decay: float, steps: int = 1500) -> torch.Tensor:
    """Full-batch Adam on the class-balanced BCE of ``module(x)`` (one logit per row); the
    last loss."""
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    share = y.double().mean()  # in float64, as numpy gave it
    pos_weight = (1 - share) / share
    module.train()
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            module(x).squeeze(1), y, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    return loss


def fit(views: list[dict]) -> dict[str, np.ndarray | float]:
    x = np.log1p(np.abs(np.array([f for v in views for f in v["features"]], dtype=np.float64)))
    y = np.array([h for v in views for h in v["hits"]], dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], 1)
    loss = train_balanced(linear, xt, yt, lr=1e-2, weight_decay=1e-4)
    print(f"fitted on {len(y)} candidates ({int(y.sum())} nodules), loss {loss.item():.3f}")
    return {"mean": mean, "std": std, "weight": linear.weight.detach().double().numpy()[0],
            "bias": float(linear.bias.item())}


def report(views: list[dict], scorer: dict) -> None:
    import models.cnn as cnn

    cnn.NODULE_SCORER = scorer
    p_all, y_all, small_all, studies = [], [], [], {}
    for v in views:
        p = cnn.nodule_probability(np.array(v["features"])) if v["features"] else np.zeros(0)
        p_all += list(p)
        y_all += v["hits"]
        small_all += v["small_hits"]
        s = studies.setdefault(v["study"], {"best": 0.0, "hit": False, "largest": 0.0,
                                            "nodule": v["nodule"], "small": v["small"]})
        if len(p) and p.max() > s["best"]:
            s["best"], s["hit"] = float(p.max()), bool(v["hits"][int(p.argmax())])
        s["largest"] = max(s["largest"], v["largest"])
    rows = list(studies.values())
    y = np.array([r["nodule"] for r in rows], dtype=float)
    print(f"candidates: {len(y_all)} ({int(sum(y_all))} nodules), AUROC "
          f"{auroc(np.array(p_all), np.array(y_all, dtype=float)):.3f}")
    p_arr, hit, tiny = np.array(p_all), np.array(y_all, bool), np.array(small_all, bool)
    keep = tiny | ~hit
    if tiny.any():
        print(f"small-nodule candidates: {int(tiny.sum())}, against the {int((~hit).sum())} of "
              f"no nodule AUROC {auroc(p_arr[keep], tiny[keep].astype(float)):.3f}; "
              f">= {cnn.NODULE_SITE_MIN_P}: {int((p_arr[tiny] >= cnn.NODULE_SITE_MIN_P).sum())} "
              f"of them, {int((p_arr[~hit] >= cnn.NODULE_SITE_MIN_P).sum())} of no nodule")
    if not all(r["nodule"] for r in rows):  # per study: needs studies without a nodule
        for name in ("best", "largest"):
            s = np.array([r[name] for r in rows])
            keep = np.array([r["small"] or not r["nodule"] for r in rows])
            what = "detector 3 best candidate" if name == "best" else "detector 2 largest"
            print(f"per study, {what}: nodule AUROC {auroc(s, y):.3f}, small nodules vs none "
                  f"{auroc(s[keep], y[keep]):.3f}")
    print(f"best candidate is a true nodule in {sum(r['hit'] for r in rows if r['nodule'])} of "
          f"{int(y.sum())} nodule studies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-studies", type=int, default=200)
    parser.add_argument("--report-studies", type=int, default=150)
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--nodules-only", action="store_true")
    args = parser.parse_args()
    options: dict = {"matrix": args.matrix}
    if args.nodules_only:
        options["force"] = {"Lung nodule": True}
    scorer = fit(candidates(args.fit_studies, FIT_SEED, **options))
    report(candidates(args.report_studies, REPORT_SEED, **options), scorer)
    print("\nNODULE_SCORER = {")
    for key in ("mean", "std", "weight"):
        print(f'    "{key}": np.array([{", ".join(f"{v:.4f}" for v in scorer[key])}]),')
    print(f'    "bias": {scorer["bias"]:.4f},')
    print("}")
    assert len(scorer["weight"]) == len(NODULE_FEATURES)


if __name__ == "__main__":
    main()
