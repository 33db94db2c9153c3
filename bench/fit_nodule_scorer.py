"""Fit nodule detector 3's candidate classifier (``models/cnn.py`` ``NODULE_SCORER``) or, with
``--mlp``, detector 4's (``NODULE_MLP_FILE``).

    .venv/bin/python bench/fit_nodule_scorer.py [--fit-studies 200] [--report-studies 150]
        [--matrix 128] [--nodules-only] [--mlp HIDDEN [--out FILE]]

Detector 4 as shipped: ``--nodules-only --fit-studies 500 --report-studies 80 --mlp 32``
(~10 minutes on 2 cores; writes ``models/nodule_scorer.safetensors``, prints detector 3 and 4
on the same seed-74 candidates and the site cut ``NODULE_SITE_MIN_P_MLP`` that lets through no
more false candidates than detector 3 at ``NODULE_SITE_MIN_P``).

Detector 2's lung field and solid tissue on phantoms of seed 73 (the detector's seed, never a
training, validation or held-out one); every candidate of ``nodule_candidates`` is labelled a
nodule when its box (one voxel of slack) holds a phantom nodule's centre: this uses the lesion
positions, which real data sets lack (the model card says so). A class-balanced logistic
regression of the log1p features, standardised, is fitted (Adam, 1,500 full-batch steps,
torch seed 0), then reported on phantoms of seed 74 (used for nothing else): candidate AUROC;
per study the best candidate's probability against detector 2's largest component (nodule
studies, small-nodule studies against studies without a nodule) and how often it is a true
nodule; and the candidates of small (<= 6 mm) nodules against those of no nodule: AUROC and how
many reach a site (``NODULE_SITE_MIN_P``). Prints the constants to paste into ``models/cnn.py``
(detector 3) or writes the MLP's weights (detector 4: log1p features standardised, ``HIDDEN``
ReLU units, dropout 0.2 while fitting, Adam 1,500 full-batch steps, torch seed 0).
``--matrix``: draw the phantoms at another in-plane matrix (the demo's data: 128);
``--nodules-only``: every phantom has one or two nodules (more candidates of small ones; the
per-study AUROCs then have no negative studies and are not printed).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import models.cnn as cnn
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


def fit(views: list[dict], hidden: int = 0) -> dict[str, np.ndarray | float]:
    """Detector 3's logistic regression (``hidden`` 0) or detector 4's MLP with ``hidden``
    ReLU units (dropout 0.2 while fitting), as :data:`models.cnn.NODULE_MLP_KEYS`."""
    x = np.log1p(np.abs(np.array([f for v in views for f in v["features"]], dtype=np.float64)))
    y = np.array([h for v in views for h in v["hits"]], dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    torch.manual_seed(0)
    if hidden:
        mlp = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                                  torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 1))
        loss = train_balanced(mlp, xt, yt, lr=3e-3, weight_decay=1e-3)
    else:
        linear = torch.nn.Linear(x.shape[1], 1)
        loss = train_balanced(linear, xt, yt, lr=1e-2, weight_decay=1e-4)
    print(f"fitted on {len(y)} candidates ({int(y.sum())} nodules), loss {loss.item():.3f}")
    if hidden:
        return {"mean": mean, "std": std, **{
            name: layer.detach().double().numpy() for name, layer in (
                ("w1", mlp[0].weight), ("b1", mlp[0].bias), ("w2", mlp[3].weight),
                ("b2", mlp[3].bias))}}
    return {"mean": mean, "std": std, "weight": linear.weight.detach().double().numpy()[0],
            "bias": float(linear.bias.item())}


def report(views: list[dict], scorer: dict | None = None) -> np.ndarray:
    """Print how ``scorer`` (an MLP of :func:`fit`; None: the shipped detector 3) does on
    ``views``; return every candidate's probability."""
    cut = cnn.site_min_p(3 if scorer is None else 4)
    p_all, y_all, small_all, studies = [], [], [], {}
    for v in views:
        p = (cnn.nodule_probability(np.array(v["features"]), scorer) if v["features"]
             else np.zeros(0))
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
              f">= {cut}: {int((p_arr[tiny] >= cut).sum())} of them, "
              f"{int((p_arr[~hit] >= cut).sum())} of no nodule")
    if not all(r["nodule"] for r in rows):  # per study: needs studies without a nodule
        for name in ("best", "largest"):
            s = np.array([r[name] for r in rows])
            keep = np.array([r["small"] or not r["nodule"] for r in rows])
            what = "best candidate" if name == "best" else "detector 2 largest"
            print(f"per study, {what}: nodule AUROC {auroc(s, y):.3f}, small nodules vs none "
                  f"{auroc(s[keep], y[keep]):.3f}")
    print(f"best candidate is a true nodule in {sum(r['hit'] for r in rows if r['nodule'])} of "
          f"{int(y.sum())} nodule studies")
    return p_arr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-studies", type=int, default=200)
    parser.add_argument("--report-studies", type=int, default=150)
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--nodules-only", action="store_true")
    parser.add_argument("--mlp", type=int, default=0, metavar="HIDDEN",
                        help="fit detector 4's MLP with HIDDEN units, write it to --out and "
                             "report detector 3 beside it")
    parser.add_argument("--out", default=str(cnn.NODULE_MLP_FILE))
    args = parser.parse_args()
    options: dict = {"matrix": args.matrix}
    if args.nodules_only:
        options["force"] = {"Lung nodule": True}
    scorer = fit(candidates(args.fit_studies, FIT_SEED, **options), args.mlp)
    views = candidates(args.report_studies, REPORT_SEED, **options)
    if args.mlp:
        from safetensors.numpy import save_file

        print("-- detector 3 (shipped logistic regression)")
        p3 = report(views)
        print(f"-- detector 4 (MLP, {args.mlp} hidden)")
        p4 = report(views, scorer)
        hit = np.array([h for v in views for h in v["hits"]], dtype=bool)
        tiny = np.array([h for v in views for h in v["small_hits"]], dtype=bool)
        false3 = int((p3[~hit] >= cnn.NODULE_SITE_MIN_P).sum())
        # the lowest cut (0.01 steps) that lets through no more false candidates
        cut = min((c / 100 for c in range(50, 100) if (p4[~hit] >= c / 100).sum() <= false3),
                  default=0.99)
        print(f"site cut for as many false candidates as detector 3 at "
              f"{cnn.NODULE_SITE_MIN_P} ({false3}): {cut:.2f}, small nodules' candidates "
              f"above it {int((p4[tiny] >= cut).sum())} (detector 3: "
              f"{int((p3[tiny] >= cnn.NODULE_SITE_MIN_P).sum())}) of {int(tiny.sum())}")
        save_file({k: np.ascontiguousarray(scorer[k], dtype=np.float64)
                   for k in cnn.NODULE_MLP_KEYS}, args.out)
        os.chmod(args.out, 0o644)  # shipped with the package
        print(f"wrote {args.out}")
        return
    cnn.NODULE_SCORER = scorer  # report the fitted regression as detector 3
    report(views)
    print("\nNODULE_SCORER = {")
    for key in ("mean", "std", "weight"):
        print(f'    "{key}": np.array([{", ".join(f"{v:.4f}" for v in scorer[key])}]),')
    print(f'    "bias": {scorer["bias"]:.4f},')
    print("}")
    assert len(scorer["weight"]) == len(NODULE_FEATURES)


if __name__ == "__main__":
    main()
