"""Linear probes: how much of each label a feature vector carries.

Per label an L2-regularised logistic regression on standardised features, its decision threshold
tuned on the training features, then F1 and AUROC on held-out features; macro averages over the
labels present. Run on the features of every stage of the model (slice encoder, Z-former,
resampler, projector) and on two controls (the same encoder with random weights, and a histogram
of Hounsfield units), it tells whether a stage learned something and where information is lost.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.findings import tune_thresholds

HU_BINS = np.linspace(-1000.0, 1300.0, 93)  # 92 bins of 25 HU


def hu_histogram(volumes: list[np.ndarray]) -> np.ndarray:
    """The no-learning control: the normalised 92-bin HU histogram of all views of a study."""
    counts = sum(np.histogram(v, bins=HU_BINS)[0] for v in volumes)
    return np.asarray(counts, dtype=np.float64) / max(1.0, float(np.sum(counts)))


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic; ties count half); nan without both classes."""
    pos, neg = scores[targets == 1], scores[targets == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, labels: list[str], weight_decay: float = 1e-2,
                 steps: int = 300) -> dict[str, Any]:
    """Fit one logistic regression per label (all at once, full batch) and score it."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xt = torch.as_tensor((train_x - mean) / std, dtype=torch.float32)
    xv = torch.as_tensor((test_x - mean) / std, dtype=torch.float32)
    yt = torch.as_tensor(train_y, dtype=torch.float32)
    w = torch.zeros(xt.shape[1], yt.shape[1], requires_grad=True)
    b = torch.zeros(yt.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
        loss = loss + weight_decay * (w ** 2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        thresholds = tune_thresholds(torch.sigmoid(xt @ w + b), yt)
        pv = torch.sigmoid(xv @ w + b).numpy()
    per: dict[str, dict[str, float]] = {}
    for j, label in enumerate(labels):
        if test_y[:, j].sum() == 0:
            continue
        pred = pv[:, j] >= thresholds[j]
        tp = float((pred & (test_y[:, j] == 1)).sum())
        f1 = 2 * tp / max(1.0, float(pred.sum() + test_y[:, j].sum()))
        per[label] = {"f1": f1, "auroc": auroc(pv[:, j], test_y[:, j])}
    f1s = [v["f1"] for v in per.values()]
    aucs = [v["auroc"] for v in per.values() if v["auroc"] == v["auroc"]]
    return {"macro_f1": float(np.mean(f1s)) if f1s else 0.0,
            "auroc": float(np.mean(aucs)) if aucs else float("nan"), "per_label": per}
