"""Commands for data and evaluation: ``phantoms`` and ``evaluate``.

They compose ``models`` (phantom generator, CT-RATE reader, metrics) with ``storage`` (the DICOM
writer), which is why they live in ``node``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

PHASE_CHOICES = {"auto": None, "non_contrast": ("non_contrast",), "arterial": ("arterial",),
                 "both": ("non_contrast", "arterial")}


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("phantoms", parents=[common], help="write synthetic chest CT studies with reports",
                       description="Write synthetic chest CT studies with reports and ground "
                                   "truth, in the CT-RATE layout or as DICOM series.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["ctrate", "dicom"], default="ctrate")
    p.add_argument("--split", default="train", help="CT-RATE split name (default train)")
    p.add_argument("--phases", choices=list(PHASE_CHOICES), default="auto",
                   help="auto: the seed picks one or two phases per study")
    p.add_argument("--reformats", action="store_true", help="add coronal and sagittal reformats")
    p.add_argument("--prevalence", type=float, default=0.3, help="chance of each abnormality")
    p.add_argument("--matrix", type=int, default=128, help="in-plane matrix size")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("evaluate", parents=[common], help="score reports against a corpus",
                       description="Score a checkpoint's reports, or given reports, against a "
                                   "CT-RATE-layout corpus; writes JSON and a Markdown table.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help='"demo" or a checkpoint folder')
    source.add_argument("--predictions", type=Path,
                        help="CSV with VolumeName, Findings_EN, Impressions_EN")
    corpus = p.add_mutually_exclusive_group(required=True)
    corpus.add_argument("--data", type=Path, help="CT-RATE-layout folder")
    corpus.add_argument("--phantoms", type=int, metavar="N",
                        help="N phantom studies generated from --phantom-seed (with lesion "
                             "positions: key-slice hits), scored in every --modes")
    p.add_argument("--phantom-seed", type=int, default=9,
                   help="phantom seed (the demo trains on 3 and validates on 4; never tune on "
                        "the seeds you report)")
    p.add_argument("--modes", default="all,first,non_contrast,swapped",
                   help="with --phantoms: all views, the first view, only the non-contrast view, "
                        "each study's views swapped for the next study's")
    p.add_argument("--split", default=None, help="only this split (default: all)")
    p.add_argument("--out", type=Path, required=True, help="FILE.json (and FILE.md beside it)")
    p.add_argument("--views", choices=["all", "first"], default="all")
    p.add_argument("--device", default="auto")
    p.add_argument("--labeler", type=Path, default=None,
                   help="local text-classifier folder (default: the rule labeler)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    p.add_argument("--per-study", type=Path, default=None, metavar="FILE.jsonl",
                   help="also write one JSON line per study (and mode): reference and draft, "
                        "the head's positive labels, and with --phantoms the true nodules and "
                        "the nodule sites the model was given")
    p.set_defaults(func=cmd_evaluate)


def add_train_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="train MS-VLM (or the baseline)",
                       description="Train from one run file (TOML): stages pretrain, mem, align, "
                                   "finetune, each resumable. Under torchrun: DDP.")
    p.add_argument("run_file", type=Path)
    p.set_defaults(func=cmd_train)


PHANTOM_OPTIONS = ("matrix", "prevalence", "reformats", "slices", "nodule_order")
"""``[data]`` keys passed to the phantom generator (also per ``extra`` group)."""


def load_dataset(data: dict[str, Any], base: Path) -> Any:
    """The ``[data]`` table of a run file -> a :class:`models.data.Dataset`."""
    from models.data import phantom_dataset

    source = data.get("source", "phantoms")
    if source == "phantoms":
        kwargs: dict[str, Any] = {k: data[k] for k in PHANTOM_OPTIONS if k in data}
        if data.get("phases", "auto") != "auto":
            kwargs["phases"] = PHASE_CHOICES[data["phases"]]
        for k, group in [("", data), *((f" extra[{i}]", g) for i, g in
                                        enumerate(data.get("extra", []) or [])
                                        if isinstance(g, dict))]:
            if group.get("nodule_order", "size") not in ("size", "placed"):
                raise ValueError(f"Invalid [data]{k} nodule_order {group['nodule_order']!r} - "
                                 "'size' (largest first) or 'placed' (as drawn)")
        extra = data.get("extra", [])
        if not isinstance(extra, list) or not all(isinstance(g, dict) for g in extra):
            raise ValueError("Invalid [data] extra - a list of tables, e.g. [{count = 400, "
                             "prevalence = 0.1}]")
        for k, group in enumerate(extra):
            unknown = set(group) - {"count", *PHANTOM_OPTIONS}
            if unknown:
                raise ValueError(f"Invalid [data] extra[{k}] key {sorted(unknown)[0]!r} - "
                                 f"count or one of {', '.join(PHANTOM_OPTIONS)}")
        return phantom_dataset(int(data.get("count", 200)), int(data.get("valid_count", 50)),
                               int(data.get("seed", 0)), extra=extra, **kwargs)
    root = Path(data.get("path", ""))
    root = root if root.is_absolute() else base / root
    if source == "ctrate":
        from models.data import ctrate_dataset

        return ctrate_dataset(root, data.get("train_split", "train"),
                              data.get("valid_split", "valid"))
    if source == "dicom":
        return dicom_dataset(root, float(data.get("valid_fraction", 0.1)))
    raise ValueError(f"Invalid [data] source {source!r} - phantoms, ctrate or dicom")


def dicom_dataset(root: Path, valid_fraction: float) -> Any:
    """A folder of DICOM studies with a ``report.json`` ({"findings", "impression"}) each;
    split by patient (a hash of the Patient ID), series read by ``storage.volumes``."""
    import hashlib

    import pydicom

    from models.data import Dataset, StudyItem
    from models.view import View
    from storage.volumes import read_series

    train: list[StudyItem] = []
    valid: list[StudyItem] = []
    for report in sorted(root.rglob("report.json")):
        folder = report.parent
        text = json.loads(report.read_text())
        files = [p for p in folder.rglob("*") if p.is_file() and p.name != "report.json"
                 and not p.name.endswith(".json")]
        by_series: dict[str, list[Path]] = {}
        patient = ""
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            by_series.setdefault(str(ds.SeriesInstanceUID), []).append(f)
            patient = str(ds.get("PatientID", folder.name))

        def load(groups: dict[str, list[Path]] = by_series) -> list[View]:
            views = []
            for paths in groups.values():
                views += [View(v.pixels, v.z_mm, v.pixel_spacing_mm, v.modality, v.plane,
                               v.phase, v.series_instance_uid) for v in read_series(paths)]
            return views

        digest = int(hashlib.sha256(patient.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        item = StudyItem(folder.name, patient, text["findings"], text["impression"], load)
        (valid if digest < valid_fraction else train).append(item)
    return Dataset(train, valid, {"source": "dicom", "root": str(root),
                                  "valid_fraction": valid_fraction})


def cmd_train(args: argparse.Namespace) -> int:
    import sys

    from models.train import RunConfig, Trainer

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    text = args.run_file.read_text()
    raw = tomllib.loads(text)
    run = RunConfig.from_toml(raw, args.run_file.resolve(), text)
    try:
        data = load_dataset(raw.get("data", {}), args.run_file.resolve().parent)
    except ValueError as exc:
        raise ValueError(f"{args.run_file}: {exc}") from None
    metrics = Trainer(run, data).train()
    if metrics:
        keys = ["ce_f1_macro", "ce_f1_micro", "bleu4", "rouge_l", "pe_f1",
                "nodule_location_accuracy", "distinct_report_share", "train_seconds"]
        print(f"Checkpoint: {run.out}")
        print("  ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics))
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    from models.phantom import iter_cases

    if args.count < 1:
        raise ValueError(f"Invalid --count {args.count} - at least 1")
    if not 0.0 <= args.prevalence <= 1.0:
        raise ValueError(f"Invalid --prevalence {args.prevalence} - between 0 and 1")
    args.out.mkdir(parents=True, exist_ok=True)
    cases = iter_cases(args.count, args.seed, phases=PHASE_CHOICES[args.phases],
                       reformats=args.reformats, prevalence=args.prevalence, matrix=args.matrix)
    if args.layout == "ctrate":
        from models.ctrate import CTRateWriter

        writer = CTRateWriter(args.out, args.split)
        for i, case in enumerate(tqdm(cases, total=args.count, desc="phantoms", unit="study")):
            writer.add(case, patient=i + 1)
        writer.close()
    else:
        from pydicom.uid import generate_uid

        from storage.volumes import StudyInfo, write_ct_series

        for case in tqdm(cases, total=args.count, desc="phantoms", unit="study"):
            study = StudyInfo(generate_uid(entropy_srcs=[case.study_id, str(case.seed)]),
                              patient_id=case.study_id, accession_number=f"PH{case.seed}"[:16])
            folder = args.out / case.study_id
            for n, view in enumerate(case.views, start=1):
                write_ct_series(folder / f"series{n:02d}", view.pixels, view.z_mm,
                                view.pixel_spacing_mm, view.plane, view.phase, study, n)
            (folder / "ground_truth.json").write_text(json.dumps(case.ground_truth(), indent=1))
    print(f"Wrote {args.count} phantom stud{'y' if args.count == 1 else 'ies'} "
          f"({args.layout}) to {args.out}")
    return 0


def _predictions(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"VolumeName", "Findings_EN", "Impressions_EN"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"Invalid predictions {path} - needs columns {sorted(needed)}")
    return {r["VolumeName"]: (r["Findings_EN"], r["Impressions_EN"]) for r in rows}


def resolve_checkpoint(value: str, base: Path | None = None) -> Path:
    """``"demo"`` (the checkpoint shipped in the package) or a folder, relative to ``base``."""
    from node.config import DEMO_CHECKPOINT

    if value == "demo":
        if not (DEMO_CHECKPOINT / "model.safetensors").exists():
            raise ValueError("Invalid checkpoint 'demo' - no demo checkpoint is shipped in this "
                             "installation yet; pass a checkpoint folder")
        return DEMO_CHECKPOINT
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_dir():
        raise ValueError(f"Invalid checkpoint {value!r} - not a folder")
    return path


MODES = ("all", "first", "non_contrast", "swapped")


def cmd_evaluate_phantoms(args: argparse.Namespace) -> int:
    """Every mode on the same in-memory phantoms: each study is encoded once and reused."""
    from models.evaluate import (ReportPair, agreement, evaluate_reports, key_slice_hit,
                                 markdown_table)
    from models.generator import ReportGenerator
    from models.labeler import make_labeler
    from models.phantom import ALL_LABELS, iter_cases

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.phantoms < 2:
        raise ValueError(f"Invalid --modes {unknown} or --phantoms {args.phantoms} - modes from "
                         f"{MODES}, at least 2 studies")
    generator = ReportGenerator.from_pretrained(resolve_checkpoint(args.checkpoint), args.device)
    cases, encoded = [], []
    for case in tqdm(iter_cases(args.phantoms, args.phantom_seed), total=args.phantoms,
                     desc="encode", unit="study"):
        cases.append(case)
        encoded.append([generator.encode_slices(v) for v in case.views])
    labeler = make_labeler(args.labeler)
    results: dict[str, Any] = {}
    lines: list[dict[str, Any]] = []
    for mode in modes:
        pairs, reports, hits = [], [], []
        for i, case in enumerate(tqdm(cases, desc=mode, unit="study")):
            if mode == "non_contrast" and case.views[0].phase != "non_contrast":
                continue  # studies without a non-contrast view do not count here
            views, enc = case.views, encoded[i]
            if mode == "swapped":
                j = (i + 1) % len(cases)
                views, enc = cases[j].views, encoded[j]
            elif mode in ("first", "non_contrast"):
                views, enc = views[:1], enc[:1]
            report = generator.report(enc)
            reports.append(report)
            pairs.append(ReportPair(case.study_id, case.findings, case.impression,
                                    report.findings, report.impression))
            if args.per_study:
                found = generator.model.last_findings
                sites = found.sites if found is not None else None
                lines.append({**_study_line(pairs[-1], report), "mode": mode,
                              "nodules": [vars(n) for n in case.nodules],
                              "sites": [] if sites is None else [
                                  [round(float(v), 3) for v in row] for row in sites[0]
                                  if float(row[0]) > 0]})
            if mode != "swapped":
                hits += list(key_slice_hit(case, report, views).values())
        metrics = evaluate_reports(pairs, labeler, meteor=not args.no_meteor)
        metrics.update(agreement(reports, labeler))
        metrics["key_slice_hit_rate"] = sum(hits) / len(hits) if hits else 0.0
        metrics["key_slice_cases"] = len(hits)
        counted = [c for c in cases if mode != "non_contrast" or
                   c.views[0].phase == "non_contrast"]
        metrics["label_prevalence"] = sum(sum(c.labels[k] for k in ALL_LABELS[:18])
                                          for c in counted) / (18 * len(counted))
        metrics.update({"source": str(args.checkpoint), "views": mode,
                        "phantom_seed": args.phantom_seed, "model_version": generator.version})
        results[mode] = metrics
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    _write_lines(args.per_study, lines)
    table = "\n".join(markdown_table(m, f"{args.checkpoint}: {mode} (phantom seed "
                                        f"{args.phantom_seed}, {m['n_studies']} studies)")
                      for mode, m in results.items())
    args.out.with_suffix(".md").write_text(table)
    print(table, end="")
    return 0


def _study_line(pair: Any, report: Any = None) -> dict[str, Any]:
    """One study of ``evaluate --per-study``: the texts and the head's positive labels."""
    line = {"study_id": pair.study_id, "reference": f"{pair.ref_findings}\n{pair.ref_impression}",
            "draft": f"{pair.pred_findings}\n{pair.pred_impression}"}
    if report is not None:
        line["head_positive"] = [f.label for f in report.positive]
    return line


def _write_lines(path: Path | None, lines: list[dict[str, Any]]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.phantoms is not None:
        if not args.checkpoint:
            raise ValueError("Invalid --phantoms - score a --checkpoint on them")
        return cmd_evaluate_phantoms(args)
    from models.ctrate import read_ctrate
    from models.evaluate import ReportPair, evaluate_reports, markdown_table
    from models.labeler import make_labeler

    pairs, lines = [], []
    if args.predictions:
        predicted = _predictions(args.predictions)
        studies = list(read_ctrate(args.data, args.split, load_views=False))
        missing = [s.study_id for s in studies if not any(v in predicted
                                                          for v in s.volume_names)]
        if missing:
            raise ValueError(f"Invalid predictions - no row for {len(missing)} studies, e.g. "
                             f"{missing[:3]}")
        for s in studies:
            volume = next(v for v in s.volume_names if v in predicted)
            pairs.append(ReportPair(s.study_id, s.findings, s.impression, *predicted[volume]))
    else:
        from models.generator import ReportGenerator

        generator = ReportGenerator.from_pretrained(resolve_checkpoint(args.checkpoint),
                                                    args.device)
        for s in tqdm(read_ctrate(args.data, args.split), desc="reports", unit="study"):
            views = s.views[:1] if args.views == "first" else s.views
            report = generator.generate(views)
            pairs.append(ReportPair(s.study_id, s.findings, s.impression, report.findings,
                                    report.impression))
            lines.append(_study_line(pairs[-1], report))
    metrics = evaluate_reports(pairs, make_labeler(args.labeler), meteor=not args.no_meteor)
    metrics["source"] = str(args.predictions or args.checkpoint)
    metrics["views"] = args.views
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2))
    _write_lines(args.per_study, lines or [_study_line(p) for p in pairs])
    table = markdown_table(metrics, f"Evaluation of {metrics['source']} on {args.data}")
    args.out.with_suffix(".md").write_text(table)
    print(table, end="")
    return 0
