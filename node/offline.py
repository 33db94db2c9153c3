"""Offline mode: ``msvlm-node report PATH --out DIR`` reads one study's DICOM files, prints the
draft report and writes the SR, through the same selection, volume reading, model and SR code
the node uses."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from node.config import Config
from node.selection import SelectionRules, SeriesInfo, select_series
from node.sr import SeriesRead, build_report_sr, sr_text
from storage import classify

logger = logging.getLogger(__name__)


class ReportError(ValueError):
    """The study cannot be reported; the message says why (stored as the job's reason)."""


def device_uid(config: Config) -> str:
    """This node's device observer UID: derived once from its AE title and host."""
    return generate_uid(entropy_srcs=["msvlm-node", config.node.ae_title, socket.gethostname()])


def series_infos(headers: dict[str, list[pydicom.Dataset]]) -> list[SeriesInfo]:
    out = []
    for uid, datasets in headers.items():
        ds = datasets[0]
        out.append(SeriesInfo(
            uid, str(ds.get("Modality", "")), ds.get("BodyPartExamined"),
            classify.plane(ds).value, classify.phase(ds), len(datasets),
            classify.is_localizer(ds), classify.image_type(ds), "Rows" in ds,
            int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
            str(ds.get("SeriesDescription", ""))))
    return out


def report_study(files: list[Path], config: Config, rules: SelectionRules | None = None,
                 generator: Any = None) -> tuple[Any, pydicom.Dataset]:
    """(Report, SR dataset) for the DICOM files of one study.

    Raises
    ------
    ReportError
        Several studies, no eligible series, or an unreadable volume.
    """
    from models.generator import ReportGenerator
    from models.view import View
    from storage.volumes import read_series

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
    if generator is None:
        generator = ReportGenerator.from_pretrained(config.model.checkpoint_path,
                                                    config.model.device)
    card = generator.card
    rules = rules or SelectionRules(modalities=card.get("modalities", ["*"]),
                                    body_parts=card.get("body_parts", ["*"]))
    selection = select_series(series_infos(headers), rules)
    if not selection.chosen:
        raise ReportError(selection.reason)
    views, read, evidence = [], [], []
    for s in selection.chosen:
        try:
            volume = read_series(paths[s.series_instance_uid])
            views.append(View(volume.pixels, volume.z_mm, volume.pixel_spacing_mm,
                              volume.modality, volume.plane, volume.phase,
                              volume.series_instance_uid))
        except ValueError as exc:
            raise ReportError(f"series {s.series_number}: unreadable volume ({exc})") from None
        read.append(SeriesRead(s.series_instance_uid, s.series_number, s.description, s.plane,
                               s.phase, s.images))
        evidence += headers[s.series_instance_uid]
    report = generator.generate(views)
    sr = build_report_sr(report.findings, report.impression, report.model_name,
                         report.model_version, device_uid(config), evidence, read)
    return report, sr


def cmd_report(args: argparse.Namespace) -> int:
    from node.cli import _config

    config = _config(args)
    if config.model.threads:
        import torch

        torch.set_num_threads(config.model.threads)
    files = [Path(dirpath) / name for dirpath, _, names in os.walk(args.path)
             for name in sorted(names)] if Path(args.path).is_dir() else [Path(args.path)]
    try:
        report, sr = report_study(files, config)
    except ReportError as exc:
        print(f"msvlm-node: not reported: {exc}")
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"SR-{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    findings, impression = sr_text(sr)  # exactly what the SR carries
    print(f"Findings: {findings}\nImpression: {impression}")
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
