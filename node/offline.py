"""Offline mode: ``msvlm-node report PATH --out DIR`` reads one study's DICOM files, prints the
draft report and writes the SR (and PDF), through the same :func:`node.draft.draft_study` as the
node's worker."""

from __future__ import annotations

import argparse
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import pydicom

from node.config import Config
from node.draft import Draft, ReportError, describe_key_image, draft_study, series_infos
from node.selection import rules_for
from node.sr import sr_text
from storage.index import Index

logger = logging.getLogger(__name__)


def read_study(files: Sequence[Path]) -> tuple[dict[str, list[pydicom.Dataset]],
                                              dict[str, list[Path]]]:
    """Headers and paths by series of the DICOM files of one study (other files skipped)."""
    headers: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    paths: dict[str, list[Path]] = defaultdict(list)
    studies = set()
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: skipped and logged
            logger.info("Skipping %s: not a DICOM file", f.name)
            continue
        if "SeriesInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            continue
        studies.add(str(ds.StudyInstanceUID))
        headers[str(ds.SeriesInstanceUID)].append(ds)
        paths[str(ds.SeriesInstanceUID)].append(f)
    if len(studies) != 1:
        raise ReportError(f"expected the files of one study, found {len(studies)} studies")
    return headers, paths


def report_study(files: Sequence[Path], config: Config, generator: Any = None,
                 device_uid: str | None = None) -> Draft:
    """The draft of the DICOM files of one study, as the node would write it.

    Raises
    ------
    ReportError
        Several studies, no eligible series, or an unreadable volume.
    """
    from models.generator import ReportGenerator

    headers, paths = read_study(files)
    if generator is None:
        generator = ReportGenerator.from_pretrained(config.model.checkpoint_path,
                                                    config.model.device)
    if device_uid is None:
        index = Index(config.storage.effective_database_url, config.file_store())
        device_uid = index.device_uid
        index.close()
    return draft_study(series_infos(headers), paths, generator,
                       rules_for(config.selection, generator.card),
                       device_uid, pdf=config.report.pdf, key_images=config.report.key_images)


def offline_config(args: argparse.Namespace) -> Config:
    """The ``-c`` file, else the default file where one exists, else built-in defaults (the
    demo checkpoint; the device identity kept in ``$XDG_DATA_HOME/msvlm-node``): reporting one
    study offline needs no configuration."""
    from node.config import default_config_path, load_config, parse_config

    if args.config or default_config_path().exists():
        return load_config(args.config)
    root = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    logger.info("No config file (%s): built-in defaults, device identity in %s",
                default_config_path(), root / "msvlm-node")
    return parse_config({"storage": {"root": str(root / "msvlm-node")}},
                        Path("(built-in defaults)"))


def cmd_report(args: argparse.Namespace) -> int:
    config = offline_config(args)
    if config.model.threads:
        import torch

        torch.set_num_threads(config.model.threads)
    files = [Path(dirpath) / name for dirpath, _, names in os.walk(args.path)
             for name in sorted(names)] if Path(args.path).is_dir() else [Path(args.path)]
    try:
        draft = report_study(files, config)
    except ReportError as exc:
        print(f"msvlm-node: not reported: {exc}")
        return 3
    report, sr = draft.report, draft.sr
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"SR-{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    if draft.pdf is not None:
        pdf_path = args.out / f"PDF-{draft.pdf.SOPInstanceUID}.dcm"
        draft.pdf.save_as(pdf_path, enforce_file_format=True)
        print(f"PDF -> {pdf_path}")
    if draft.kos is not None:
        kos_path = args.out / f"KO-{draft.kos.SOPInstanceUID}.dcm"
        draft.kos.save_as(kos_path, enforce_file_format=True)
        print(f"Key images -> {kos_path}")
    findings, impression = sr_text(sr)  # exactly what the SR carries
    print(f"Findings: {findings}\nImpression: {impression}")
    if draft.coded:
        print("Structured findings (probability; key slices):")
        for f in draft.coded:
            side = f" ({f.laterality})" if f.laterality else ""
            keys = "; ".join(describe_key_image(k) for k in f.key_images)
            print(f"  {f.label}{side}: {f.probability:.2f}; {keys}")
    elif report.structured:
        print("Structured findings: none positive")
    print(f"({report.model_name} {report.model_version}; encode {report.timings['encode_s']:.1f}"
          f" s, generate {report.timings['generate_s']:.1f} s) -> {path}")
    return 0


def add_report_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("report", parents=[common], help="draft a report for one study offline",
                       description="Read one study's DICOM files, print the draft report and "
                                   "write its SR into --out.")
    p.add_argument("path", help="a folder (or file) holding one study")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_report)
