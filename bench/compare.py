"""Side-by-side Markdown table of several ``msvlm-node evaluate`` JSON files.

    .venv/bin/python bench/compare.py NAME=FILE.json[#MODE] [NAME=FILE.json[#MODE] ...]

``#MODE`` picks one mode of an ``evaluate --phantoms`` file (all, first, non_contrast, swapped).
"""

from __future__ import annotations

import json
import sys

ROWS = ["n_studies", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l",
        "impression_bleu4", "impression_rouge_l", "ce_precision_macro", "ce_recall_macro",
        "ce_f1_macro", "ce_precision_micro", "ce_recall_micro", "ce_f1_micro", "pe_f1",
        "ce_f1_macro_19", "small_nodule_f1", "nodule_location_accuracy",
        "distinct_report_share", "report_head_agreement", "report_head_agreement_studies",
        "key_slice_hit_rate", "label_prevalence"]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    runs = {}
    for arg in argv:
        name, _, path = arg.partition("=")
        path, _, mode = path.partition("#")
        with open(path) as f:
            runs[name] = json.load(f)[mode] if mode else json.load(f)
    names = list(runs)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in ROWS:
        cells = []
        for n in names:
            v = runs[n].get(key, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    labels = sorted({k for r in runs.values() for k in r.get("per_label_f1", {})})
    lines += ["", "| per-label F1 | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label in labels:
        cells = [f"{runs[n].get('per_label_f1', {}).get(label, float('nan')):.3f}"
                 for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
