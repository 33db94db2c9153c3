"""The finding head: one learned query per label over the Z-former's slice tokens.

Per label a logit and an attention distribution over every slice of every view; the slices a
positive label attends to most are its key slices, the evidence a radiologist checks the draft
against. The label list is part of the checkpoint's config (the 18 CT-RATE labels plus pulmonary
embolism for the phantoms, any list for another data set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn


@dataclass
class FindingOutput:
    """The head's answer for a batch of studies."""

    logits: torch.Tensor  # (B, N)
    attention: torch.Tensor  # (B, N, L): mean over heads, 0 on padding
    valid: torch.Tensor  # (B, L)
    evidence: torch.Tensor | None = None  # (B, N, L): with lesion cues, see FindingHead
    cue_logits: torch.Tensor | None = None  # (B, N): the cue path alone (its own loss)
    where: torch.Tensor | None = None  # (B, N, C+1): MSVLM.read with finding_evidence
    cue_slices: torch.Tensor | None = None  # (B, N, L): each slice's share of the cue path
    sites: torch.Tensor | None = None  # (B, K, 4): MSVLM.read with finding_sites

    @property
    def key_weights(self) -> torch.Tensor:
        """``(B, N, L)`` per label the weight of each slice as evidence (key slices): the
        attention, or with lesion cues :attr:`evidence`."""
        return self.attention if self.evidence is None else self.evidence

    @classmethod
    def stack(cls, outputs: Sequence[FindingOutput]) -> FindingOutput:
        """One batch of several answers (each of its own studies): the slice axis padded to
        the longest (0, as the head leaves padding; ``valid`` False there)."""
        L = max(o.valid.shape[1] for o in outputs)

        def join(name: str) -> torch.Tensor | None:
            parts = [getattr(o, name) for o in outputs]
            if any(p is None for p in parts):
                return None
            if name in ("attention", "evidence", "cue_slices", "valid"):
                parts = [nn.functional.pad(p, (0, L - p.shape[-1])) for p in parts]
            return torch.cat(parts)

        return cls(**{f.name: join(f.name) for f in fields(cls)})


class FindingHead(nn.Module):
    """Multi-head cross-attention of ``num_labels`` queries over ``(B, L, D)`` slice tokens,
    then a per-label linear read-out of each query's pooled vector.

    With ``cue_dim`` the head also reads ``(B, L, cue_dim)`` per-slice lesion cues (the
    pyramid encoder's, ``models/cnn.py``): their maximum over the study's slices, through one
    linear layer (zero at start), is added to the logits. A lesion on a few slices is a
    maximum, which attention pooling over hundreds of slices learned too slowly to find. The
    key-slice weights (``evidence``) then mix the attention with each slice's own cue
    contribution (softmax over slices), each by its share of the label's logit, so a finding
    the cues decided points at the slice that showed the cue. ``cue_logits`` (the cue path
    alone) take a loss of their own in training (``[findings] cue_loss``): without it the
    attention path fitted the training labels first and the cue path stopped learning
    (embolism: validation AUROC 0.81 from the head, 0.98 from one cue alone).

    With ``cue_cells`` (the cues come as ``cue_dim // cue_cells`` types of ``cue_cells`` grid
    cells each, type-major) the cue path also reads each type's maximum over the cells: a
    nodule lies in one of nine cells, so no single cell's maximum carries it (validation AUROC
    of the sparse fit for lung nodule: 0.50 with no cue kept from the 45 cells, 0.83 with the
    per-type maxima; embolism 0.98 / 0.97)."""

    def __init__(self, num_labels: int, dim: int, heads: int = 4, cue_dim: int = 0,
                 cue_cells: int = 0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Invalid 'head_heads' {heads} - must divide z_hidden {dim}")
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(num_labels, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.weight = nn.Parameter(torch.randn(num_labels, dim) * 0.02)
        self.bias = nn.Parameter(torch.zeros(num_labels))
        if cue_cells and cue_dim % cue_cells:
            raise ValueError(f"Invalid cue_cells {cue_cells} - must divide the {cue_dim} cues")
        self.cue_cells = cue_cells
        self.cue: nn.Linear | None = None
        if cue_dim:
            self.cue = nn.Linear(cue_dim + (cue_dim // cue_cells if cue_cells else 0), num_labels)
            nn.init.zeros_(self.cue.weight)
            nn.init.zeros_(self.cue.bias)

    def cue_inputs(self, cues: torch.Tensor) -> torch.Tensor:
        """``(..., cue_dim)`` cues -> what the cue path reads: the cues, then with
        ``cue_cells`` each cue type's maximum over its cells."""
        if not self.cue_cells:
            return cues
        types = cues.shape[-1] // self.cue_cells
        return torch.cat([cues, cues.unflatten(-1, (types, self.cue_cells)).amax(-1)], dim=-1)

    @torch.no_grad()
    def fit_cues(self, peaks: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor,
                 l1: float | Sequence[float] = 0.01, steps: int = 3000, lr: float = 0.05,
                 labels: Sequence[int] | None = None, folds: int = 5) -> list[float]:
        """Set the cue path to the per-label sparse logistic regression (class-balanced BCE,
        L1 ``l1`` on the weights, proximal gradient) of ``(n, N)`` 0/1 ``targets`` on the
        studies' cue maxima ``(n, cue_dim)`` (read through :meth:`cue_inputs`), each cue
        standardised over the studies (folded into the weights). Returns each label's L1.

        Measured on the validation split of a findings run (embolism, 300 training studies):
        one cue alone separates at AUROC 0.98; the cue path trained from zero by the head's
        optimiser reached 0.79, a dense (L2) logistic regression of all 45 maxima 0.85, this
        sparse one 0.98 with two cues.

        ``l1`` a list of strengths: per label the one whose ``folds``-fold cross-validated
        AUROC on these (training) studies is best, the larger on a tie (sparser). Measured on
        the detector-3 candidate's 1,200 training studies: at 0.01 the embolism kept 16 cues
        (training AUROC 0.983, validation 0.954), at 0.19 two (0.991, 0.984); no single
        strength is best for every label, and the training studies alone can tell.

        ``labels``: the indices of the labels the cues are meant for (``[findings]
        cue_labels``); the other labels' rows stay zero, so their logits come from the
        attention read-out alone. Fitted for all 19 labels of the detector-2 demo candidate,
        every label kept 14-28 cues and Lymphadenopathy, which no cue measures, fell to
        validation AUROC 0.43 (0.83 in the detector-1 demo, whose fit kept 0-3 cues per label)."""
        assert self.cue is not None
        x, y = self.cue_inputs(peaks.float()), targets.float()
        grid = [float(l1)] if isinstance(l1, (int, float)) else [float(v) for v in l1]
        chosen = [grid[0]] * y.shape[1]
        if len(grid) > 1:  # only the labels the cues are meant for (each its own regression)
            cols = list(labels) if labels is not None else list(range(y.shape[1]))
            for j, strength in zip(cols, cross_validated_l1(
                    x, y[:, cols], pos_weight.reshape(-1)[cols] if pos_weight.numel() > 1
                    else pos_weight, grid, folds, steps, lr)):
                chosen[j] = strength
        mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
        weight, bias = sparse_logistic((x - mean) / std, y, pos_weight,
                                       torch.tensor(chosen, device=x.device), steps, lr)
        if labels is not None:
            keep = torch.zeros(y.shape[1], 1, device=x.device)
            keep[list(labels)] = 1.0
            weight, bias = weight * keep, bias * keep[:, 0]
        self.cue.weight.copy_(weight / std)
        self.cue.bias.copy_(bias - (weight / std) @ mean)
        return chosen

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor,
                cues: torch.Tensor | None = None) -> FindingOutput:
        B, L, D = tokens.shape
        H, d = self.heads, D // self.heads
        x = self.norm(tokens)
        k = self.key(x).view(B, L, H, d).transpose(1, 2)  # (B, H, L, d)
        v = self.value(x).view(B, L, H, d).transpose(1, 2)  # (B, H, L, d)
        q = self.queries.view(-1, H, d).transpose(0, 1)  # (H, N, d)
        scores = torch.einsum("hnd,bhld->bhnl", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        att = scores.softmax(dim=-1)  # (B, H, N, L)
        pooled = torch.einsum("bhnl,bhld->bnhd", att, v).reshape(B, -1, D)  # (B, N, D)
        h = self.out_norm(pooled)
        h = h + self.mlp(h)
        read = (h * self.weight).sum(dim=-1)  # (B, N)
        attention = att.mean(dim=1)
        if self.cue is None or cues is None:
            return FindingOutput(read + self.bias, attention, valid)
        cues = self.cue_inputs(cues)  # (B, L, C'): the maxima commute with the one over slices
        peak = cues.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)  # (B, C')
        cue_part = peak @ self.cue.weight.T  # (B, N)
        per_slice = (cues @ self.cue.weight.T).transpose(1, 2)  # (B, N, L)
        per_slice = per_slice.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1)
        share = (cue_part.abs() / (cue_part.abs() + read.abs()).clamp_min(1e-6))[..., None]
        evidence = (1 - share) * attention + share * per_slice
        return FindingOutput(read + cue_part + self.cue.bias + self.bias, attention, valid,
                             evidence, cue_part + self.cue.bias, cue_slices=per_slice)


def sparse_logistic(z: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor,
                    l1: torch.Tensor, steps: int = 3000, lr: float = 0.05
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label the L1 (``l1``: one strength per label, ``(N,)``) logistic regression of the
    ``(n, N)`` 0/1 ``y`` on standardised ``z`` ``(n, D)`` with class-balanced BCE, by proximal
    gradient: ``(weight (N, D), bias (N,))``."""
    weight = torch.zeros(y.shape[1], z.shape[1], device=z.device)
    bias = torch.zeros(y.shape[1], device=z.device)
    step_l1 = lr * l1.to(z.device)[:, None]
    for _ in range(steps):
        with torch.enable_grad():
            w, b = weight.requires_grad_(True), bias.requires_grad_(True)
            # summed over labels: each label's regression is its own problem (a mean over the
            # N labels divided every gradient by N against the same L1 step, so only a label's
            # one or two strongest cues survived: on detector 2 the nodule's path kept two
            # single cells, validation AUROC 0.793, where the label fitted alone takes the
            # cells' maximum, 0.875)
            loss = nn.functional.binary_cross_entropy_with_logits(
                z @ w.T + b, y, pos_weight=pos_weight.float().to(z.device),
                reduction="none").mean(0).sum()
            grad_w, grad_b = torch.autograd.grad(loss, [w, b])
        weight = weight.detach() - lr * grad_w
        bias = bias.detach() - lr * grad_b
        weight = weight.sign() * (weight.abs() - step_l1).clamp_min(0)  # soft threshold
    return weight, bias


def cross_validated_l1(x: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor,
                       grid: Sequence[float], folds: int = 5, steps: int = 3000,
                       lr: float = 0.05) -> list[float]:
    """Per label the strength of ``grid`` whose :func:`sparse_logistic` fits best rank held-out
    studies (``folds``-fold AUROC on ``x`` ``(n, D)``, ``y`` ``(n, N)``; fixed folds), the
    larger on a tie; a label without both classes in a fold counts that fold as 0.5."""
    from models.probe import auroc

    order = torch.arange(len(x)) % folds
    scores = torch.zeros(len(grid), y.shape[1])
    for k in range(folds):
        train, test = order != k, order == k
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
        for g, strength in enumerate(grid):
            w, b = sparse_logistic((x[train] - mean) / std, y[train], pos_weight,
                                   torch.full((y.shape[1],), strength), steps, lr)
            logits = (((x[test] - mean) / std) @ w.T + b).cpu().numpy()
            truth = y[test].cpu().numpy().astype(int)
            for j in range(y.shape[1]):
                both = 0 < truth[:, j].sum() < len(truth)
                scores[g, j] += auroc(logits[:, j], truth[:, j]) if both else 0.5
    best = []
    for j in range(y.shape[1]):  # the larger strength on a tie: scan from the largest
        ranked = sorted(range(len(grid)), key=lambda g: (-round(float(scores[g, j]), 6),
                                                          -grid[g]))
        best.append(float(grid[ranked[0]]))
    return best


def decisions(probabilities: torch.Tensor, thresholds: list[float] | None) -> torch.Tensor:
    """``(B, N)`` 0/1 decisions: each label's probability at or above its stored threshold
    (0.5 where none is stored yet)."""
    if thresholds:
        t = torch.as_tensor(thresholds, dtype=probabilities.dtype, device=probabilities.device)
    else:
        t = torch.full_like(probabilities[0], 0.5)
    return (probabilities >= t).long()


def key_slices(attention: torch.Tensor, lengths: list[int], k: int) -> list[tuple[int, int, float]]:
    """Top-``k`` slices of each view by one label's attention ``(L,)`` (views concatenated in
    ``lengths``): ``(view index, slice index, weight)``, heaviest first."""
    out: list[tuple[int, int, float]] = []
    offset = 0
    for view, n in enumerate(lengths):
        part = attention[offset:offset + n]
        top = torch.topk(part, min(k, n))
        out += [(view, int(i), float(w)) for w, i in zip(top.values, top.indices)]
        offset += n
    return sorted(out, key=lambda row: -row[2])


def choose_sources(head: torch.Tensor, cues: torch.Tensor, targets: torch.Tensor,
                   margin: float = 0.02) -> list[str]:
    """Per label ``"cues"`` where the cue path's ``(n, N)`` probabilities separate the 0/1
    ``targets`` better than the whole head's by more than ``margin`` (AUROC), else ``"head"``
    (a label without both classes keeps the head)."""
    from models.probe import auroc

    out = []
    for j in range(targets.shape[1]):
        y = targets[:, j].long().numpy()
        if y.min() == y.max():
            out.append("head")
            continue
        better = auroc(cues[:, j].numpy(), y) > auroc(head[:, j].numpy(), y) + margin
        out.append("cues" if better else "head")
    return out


NEVER = 1.01
"""The threshold of a label the head cannot see: no probability reaches it."""


def tune_thresholds(probabilities: torch.Tensor, targets: torch.Tensor,
                    min_auroc: float = 0.0) -> list[float]:
    """Per label the threshold that maximises F1 on ``(n, N)`` probabilities and 0/1 targets
    (a label with no positive keeps 0.5).

    Every threshold between the lowest probability called positive and the highest one below it
    gives the same F1 here; the threshold is the middle of that interval in logit space, so a
    new study needs as much margin to fall on the wrong side either way. (The lowest probability
    called positive itself, the old choice, put cardiomegaly's threshold at 0.9996 on the demo's
    100 validation studies, where a positive study 0.0004 less sure is missed.)

    For a label whose AUROC on these data is below ``min_auroc`` the F1-best threshold is "call
    everyone positive" (F1 about 2p/(1+p) with no information); such a label gets ``NEVER``
    instead, so drafts do not state a finding the model cannot see."""
    from models.probe import auroc

    out = []
    for j in range(probabilities.shape[1]):
        p, y = probabilities[:, j].double(), targets[:, j].bool()
        best, best_t = -1.0, 0.5
        if y.any() and min_auroc > 0 and auroc(p.numpy(), y.long().numpy()) < min_auroc:
            out.append(NEVER)
            continue
        if not y.any():
            out.append(best_t)
            continue
        for t in torch.unique(p).tolist():
            pred = p >= t
            tp = int((pred & y).sum())
            f1 = 2 * tp / max(1, int(pred.sum()) + int(y.sum()))
            if f1 > best:
                best, best_t = f1, float(t)
        below = p[p < best_t]
        if len(below):  # the middle, in logit space, of the interval with the same decisions
            ends = torch.logit(torch.stack([below.max(), p.new_tensor(best_t)]), eps=1e-12)
            best_t = float(torch.sigmoid(ends.mean()))
        out.append(best_t)
    return out
