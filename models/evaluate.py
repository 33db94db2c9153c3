"""Report evaluation: NLG metrics (pycocoevalcap) and clinical efficacy (labels from the text).

``evaluate_reports(references, predictions)`` returns the JSON the ``evaluate`` command writes:
BLEU-1..4, METEOR and ROUGE-L on Findings (as CT2Rep and MS-VLM report) and BLEU-4/ROUGE-L on
Impression; precision/recall/F1 macro and micro over the 18 CT-RATE labels labelled from
Findings + Impression (labels absent from the references are left out of the macro and listed;
0/0 scores 0); per-label F1; pulmonary-embolism F1; small-nodule (<= 6 mm) F1; nodule location
(side and lobe) accuracy; and the share of distinct reports (mode collapse shows as a low share).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from models.labeler import Labeler, RuleLabeler, binary, disagreements
from models.phantom import LABELS, PE_LABEL

_TOKEN = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_NODULE = re.compile(r"(?P<size>\d+(?:\.\d+)?)\s*mm\b[^.]*?\bnodul\w*[^.]*?\b(?P<side>right|left)"
                     r"\s+(?P<lobe>upper|middle|lower)\s+lobe", re.I)
_NODULE_ANY_SIZE = re.compile(r"(?P<size>\d+(?:\.\d+)?)\s*mm\b[^.]*?\bnodul", re.I)
SMALL_NODULE_MM = 6.0


@dataclass(frozen=True)
class ReportPair:
    """One study: the reference and the predicted report."""

    study_id: str
    ref_findings: str
    ref_impression: str
    pred_findings: str
    pred_impression: str


def tokenize(text: str) -> str:
    """Lower-case word tokens joined by spaces (what the NLG scorers compare)."""
    return " ".join(_TOKEN.findall(text.lower()))


def nlg_scores(references: Sequence[str], predictions: Sequence[str],
               meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and (with a Java runtime) METEOR, corpus level."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [tokenize(r) or "empty"] for i, r in enumerate(references)}
    res = {i: [tokenize(p) or "empty"] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(bleu[n]) for n in range(4)}
    out["rouge_l"] = float(rouge)
    if meteor:
        if shutil.which("java") is None:
            raise RuntimeError("METEOR needs a Java runtime (apt-get install default-jre-headless)")
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # runs the bundled meteor-1.5.jar; its __del__ stops the JVM
        try:
            score, _ = scorer.compute_score(gts, res)
            out["meteor"] = float(score)
        finally:
            del scorer
    return out


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def nodules(text: str) -> list[tuple[float, str | None, str | None]]:
    """(size mm, side, lobe) of each nodule mention with a size."""
    found = [(float(m["size"]), m["side"].lower(), m["lobe"].lower())
             for m in _NODULE.finditer(text)]
    if not found:
        found = [(float(m["size"]), None, None) for m in _NODULE_ANY_SIZE.finditer(text)]
    return found


def evaluate_reports(pairs: Sequence[ReportPair], labeler: Labeler | None = None,
                     meteor: bool = True) -> dict[str, Any]:
    """All metrics for ``pairs``; see the module docstring."""
    if not pairs:
        raise ValueError("Invalid 'pairs' - nothing to evaluate")
    labeler = labeler or RuleLabeler()
    out: dict[str, Any] = {"n_studies": len(pairs)}
    out.update(nlg_scores([p.ref_findings for p in pairs], [p.pred_findings for p in pairs],
                          meteor))
    imp = nlg_scores([p.ref_impression for p in pairs], [p.pred_impression for p in pairs],
                     meteor=False)
    out["impression_bleu4"], out["impression_rouge_l"] = imp["bleu4"], imp["rouge_l"]

    refs = [binary(labeler.label(f"{p.ref_findings}\n{p.ref_impression}")) for p in pairs]
    preds = [binary(labeler.label(f"{p.pred_findings}\n{p.pred_impression}")) for p in pairs]
    counts: dict[str, tuple[int, int, int]] = {}
    for label in LABELS + [PE_LABEL]:
        counts[label] = (sum(int(r[label] and q[label]) for r, q in zip(refs, preds)),
                         sum(int(not r[label] and q[label]) for r, q in zip(refs, preds)),
                         sum(int(r[label] and not q[label]) for r, q in zip(refs, preds)))
    present = [label for label in LABELS if sum(r[label] for r in refs) > 0]
    out["labels_absent_from_split"] = [label for label in LABELS if label not in present]
    per = {label: _prf(*counts[label]) for label in LABELS}
    out["per_label_f1"] = {label: per[label][2] for label in present}
    n = max(len(present), 1)
    out["ce_precision_macro"] = sum(per[label][0] for label in present) / n
    out["ce_recall_macro"] = sum(per[label][1] for label in present) / n
    out["ce_f1_macro"] = sum(per[label][2] for label in present) / n
    micro = [sum(counts[label][i] for label in present) for i in range(3)]
    (out["ce_precision_micro"], out["ce_recall_micro"], out["ce_f1_micro"]) = _prf(*micro)
    out["pe_f1"] = _prf(*counts[PE_LABEL])[2]
    with_pe = [per[label][2] for label in present] + (
        [out["pe_f1"]] if any(r[PE_LABEL] for r in refs) else [])
    out["ce_f1_macro_19"] = sum(with_pe) / max(len(with_pe), 1)  # the 18 labels + embolism
    out["pe_positive_studies"] = sum(r[PE_LABEL] for r in refs)

    small_tp = small_fp = small_fn = 0
    located = correct = 0
    for p in pairs:
        ref_n = nodules(f"{p.ref_findings} {p.ref_impression}")
        pred_n = nodules(f"{p.pred_findings} {p.pred_impression}")
        ref_small = any(size <= SMALL_NODULE_MM for size, _, _ in ref_n)
        pred_small = any(size <= SMALL_NODULE_MM for size, _, _ in pred_n)
        small_tp += int(ref_small and pred_small)
        small_fp += int(pred_small and not ref_small)
        small_fn += int(ref_small and not pred_small)
        ref_places = {(side, lobe) for _, side, lobe in ref_n if side}
        if ref_places:
            located += 1
            correct += int(any((side, lobe) in ref_places for _, side, lobe in pred_n if side))
    out["small_nodule_f1"] = _prf(small_tp, small_fp, small_fn)[2]
    out["small_nodule_studies"] = small_tp + small_fn
    out["nodule_location_accuracy"] = correct / located if located else 0.0
    out["nodule_studies"] = located
    texts = [f"{p.pred_findings}\n{p.pred_impression}".strip() for p in pairs]
    out["distinct_report_share"] = len(set(texts)) / len(texts)
    return out


def agreement(reports: Sequence[Any], labeler: Labeler | None = None) -> dict[str, float]:
    """How well each draft's text follows its own finding head: the labeler's reading of the
    text against the head's decisions, per (study, label) and per study (all labels agree)."""
    labeler = labeler or RuleLabeler()
    pairs = total = whole = 0
    for report in reports:
        if not report.structured:
            continue
        wrong = disagreements(labeler, f"{report.findings}\n{report.impression}",
                              [(f.label, f.present) for f in report.structured])
        pairs += len(report.structured) - len(wrong)
        total += len(report.structured)
        whole += int(not wrong)
    n = sum(1 for r in reports if r.structured)
    return {"report_head_agreement": pairs / total if total else 0.0,
            "report_head_agreement_studies": whole / n if n else 0.0,
            # drafts decoded again because the greedy text disagreed (``agree_beams``)
            "redecoded_share": sum("redecode_s" in r.timings for r in reports) / max(len(
                reports), 1)}


def key_slice_hit(case: Any, report: Any, views: Sequence[Any]) -> dict[str, int]:
    """For a phantom case: whether the top key slice of a (truly and predictedly) positive lung
    nodule or pulmonary embolism lies within that lesion's z extent (half a slice of slack).
    Returns ``{label: 1 or 0}`` for the labels that count in this case."""
    out: dict[str, int] = {}
    for finding in report.positive:
        if not finding.key_slices or not case.labels.get(finding.label):
            continue
        view, index = finding.key_slices[0]
        z = float(views[view].z_mm[index])
        slack = float(np.diff(views[view].z_mm).mean()) / 2 if views[view].num_slices > 1 else 0
        if finding.label == "Lung nodule" and case.nodules:
            out[finding.label] = int(any(abs(z - n.center_mm[2]) <= n.diameter_mm / 2 + slack
                                         for n in case.nodules))
        elif finding.label == PE_LABEL and case.embolus and "center_mm" in case.embolus:
            e = case.embolus
            out[finding.label] = int(abs(z - e["center_mm"][2]) <= e["radius_mm"] + slack)
    return out


def markdown_table(metrics: dict[str, Any], title: str = "Evaluation") -> str:
    """The headline numbers and per-label F1 as Markdown."""
    keys = ["n_studies", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l",
            "impression_bleu4", "impression_rouge_l", "ce_precision_macro", "ce_recall_macro",
            "ce_f1_macro", "ce_precision_micro", "ce_recall_micro", "ce_f1_micro", "pe_f1",
            "ce_f1_macro_19",
            "small_nodule_f1", "nodule_location_accuracy", "distinct_report_share",
            "report_head_agreement", "report_head_agreement_studies", "redecoded_share",
            "key_slice_hit_rate",
            "label_prevalence"]
    lines = [f"## {title}", "", "| metric | value |", "|---|---|"]
    for key in keys:
        if key in metrics:
            value = metrics[key]
            lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float)
                         else f"| {key} | {value} |")
    lines += ["", "| label | F1 |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in metrics.get("per_label_f1", {}).items()]
    if metrics.get("labels_absent_from_split"):
        lines += ["", "Labels absent from the references (left out of the macro average): "
                  + ", ".join(metrics["labels_absent_from_split"])]
    return "\n".join(lines) + "\n"
