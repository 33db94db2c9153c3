"""One study's headers and files -> the draft: selection, volumes, model, SR (and PDF).

The node's worker and the offline ``report`` command both call :func:`draft_study`, so a study
gets the same report whichever way it arrives.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pydicom

from node.selection import Selection, SelectionRules, SeriesInfo, select_series
from node.sr import (CodedFinding, KeyImage, SeriesRead, build_key_images, build_report_sr,
                     statement)
from storage import classify

logger = logging.getLogger(__name__)


class ReportError(ValueError):
    """The study cannot be reported; the message says why (stored as the job's reason)."""


@dataclass
class Draft:
    """What one model call produced, with the time each stage took."""

    report: Any
    sr: pydicom.Dataset
    pdf: pydicom.Dataset | None
    selection: Selection
    timings: dict[str, float] = field(default_factory=dict)
    coded: list[CodedFinding] = field(default_factory=list)
    """The positive findings as coded in the SR, with their key slices."""
    kos: pydicom.Dataset | None = None
    """The Key Object Selection document of the key slices (``[report] key_images``)."""


def series_infos(headers: Mapping[str, Sequence[pydicom.Dataset]]) -> list[SeriesInfo]:
    """Selection's view of each series, from the headers of its instances."""
    out = []
    for uid, datasets in headers.items():
        ds = datasets[0]
        images = sum(int(d.get("NumberOfFrames", 1) or 1) for d in datasets)
        out.append(SeriesInfo(
            uid, str(ds.get("Modality", "")), ds.get("BodyPartExamined"),
            classify.plane(ds).value, classify.phase(ds), images,
            classify.is_localizer(ds), classify.image_type(ds), "Rows" in ds,
            int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
            str(ds.get("SeriesDescription", ""))))
    return out


def key_image(headers: Sequence[pydicom.Dataset], index: int) -> KeyImage:
    """The instance (and frame) holding slice ``index`` of a view read from ``headers``: one
    header per slice in slice order, or one multi-frame image."""
    if len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1) or 1) > 1:
        return KeyImage(headers[0], index + 1)
    return KeyImage(headers[index])


def coded_findings(report: Any, headers: Sequence[Sequence[pydicom.Dataset]]
                   ) -> list[CodedFinding]:
    """The report's positive findings with their key slices mapped to instances, and the side
    the draft's text states for each."""
    from models.labeler import stated_side

    text = f"{report.findings}\n{report.impression}"
    return [CodedFinding(f.label, f.probability, stated_side(text, f.label),
                         tuple(key_image(headers[v], s) for v, s in f.key_slices))
            for f in report.positive]


def describe_key_image(key: KeyImage) -> str:
    """``series 3, instance 41, z -112.5 mm`` (frame for multi-frame images)."""
    ds = key.dataset
    where = f"series {ds.get('SeriesNumber', '?')}, instance {ds.get('InstanceNumber', '?')}"
    if key.frame:
        return f"{where}, frame {key.frame}"
    z = classify.position_along_normal(ds)
    return f"{where}, z {z:.1f} mm" if z is not None else where


def draft_study(series: Sequence[SeriesInfo], paths: Mapping[str, Sequence[Path]],
                generator: Any, rules: SelectionRules,
                device_uid: str, previous: Sequence[pydicom.Dataset] = (),
                pdf: bool = False, key_images: bool = False,
                cached: Mapping[Path, bytes] | None = None,
                headers_known: Any = None) -> Draft:
    """Draft the report of one study.

    Parameters
    ----------
    series : sequence of SeriesInfo
        The study's series (from the index, or from headers in offline mode).
    paths : mapping
        Series Instance UID -> the image files of that series (read only when selected).
    generator : models.generator.ReportGenerator
        The loaded checkpoint.
    rules : SelectionRules
        Which series to read.
    device_uid : str
        The node's device observer UID (kept in the index).
    previous : sequence of Dataset
        Earlier SRs of this study (referenced as Predecessor Documents).
    pdf : bool
        Also render an Encapsulated PDF of the report.
    key_images : bool
        Also write a Key Object Selection document of the findings' key slices.
    cached : mapping, optional
        Slice embeddings computed while the study arrived (file -> float32 bytes, under the
        generator's ``stream_key``): those slices' pixels are not read again.
    headers_known : storage.volumes.HeaderCache, optional
        Headers of slices streaming read: not read again.

    Raises
    ------
    ReportError
        No eligible series, or an unreadable volume; the message is the stored reason.
    """
    from storage.volumes import VolumeError

    timings: dict[str, float] = {"load_s": 0.0, "encode_s": 0.0}
    selection = select_series(series, rules)
    if not selection.chosen:
        raise ReportError(selection.reason)
    encoded: list[Any] = []
    headers: list[list[pydicom.Dataset]] = []
    read: list[SeriesRead] = []
    evidence: list[pydicom.Dataset] = []
    streamed = 0
    for s in selection.chosen:
        files = paths[s.series_instance_uid]
        hits = {p: cached[p] for p in files if p in cached} if cached else {}
        try:
            views = (_streamed_view(files, hits, generator, timings, headers_known)
                     if hits else None)
            if views is None:
                views = _read_view(files, generator, timings)
            else:
                streamed += len(hits)
        except VolumeError as exc:  # the data's fault: permanent; OSError propagates (retried)
            logger.debug("Series %s: %s", s.series_instance_uid, exc.detail)
            raise ReportError(f"series {s.series_number}: unreadable volume ({exc})") from None
        for view, view_headers in views:  # several multi-frame objects: several views
            encoded.append(view)
            evidence += view_headers
            headers.append(view_headers)
        read.append(SeriesRead(s.series_instance_uid, s.series_number, s.description, s.plane,
                               s.phase, s.images))
    timings["streamed_slices"] = float(streamed)
    report = generator.report(encoded, timings=timings)
    timings.update(report.timings)
    start = time.perf_counter()
    coded = coded_findings(report, headers)
    sr = build_report_sr(report.findings, report.impression, report.model_name,
                         report.model_version, device_uid, evidence, read, previous=previous,
                         coded=coded, not_assessed=report.not_assessed)
    document = None
    if pdf:
        from node.pdf import build_report_pdf, render_pdf

        document = build_report_pdf(sr, render_pdf(report.findings, report.impression,
                                                   report.model_name, report.model_version,
                                                   statement(read, report.not_assessed)))
    kos = build_key_images(coded, report.model_name, report.model_version,
                           device_uid) if key_images else None
    timings["sr_s"] = time.perf_counter() - start
    return Draft(report, sr, document, selection, timings, coded, kos)


def _read_view(files: Sequence[Path], generator: Any,
               timings: dict[str, float]) -> list[tuple[Any, list[pydicom.Dataset]]]:
    """Read a series whole (DICOM -> volumes) and encode every slice."""
    from models.view import View
    from storage.volumes import read_series

    start = time.perf_counter()
    volumes = read_series(files)
    timings["load_s"] += time.perf_counter() - start
    out = []
    for v in volumes:
        start = time.perf_counter()
        view = View(v.pixels, v.z_mm, v.pixel_spacing_mm, v.modality, v.plane, v.phase,
                    v.series_instance_uid)
        out.append((generator.encode_slices(view), v.headers))
        timings["encode_s"] += time.perf_counter() - start
    return out


def _streamed_view(files: Sequence[Path], hits: Mapping[Path, bytes], generator: Any,
                   timings: dict[str, float], known: Any = None
                   ) -> list[tuple[Any, list[pydicom.Dataset]]] | None:
    """A series whose slices were (partly) encoded while it arrived: pixels and encoding for
    the slices not cached yet, headers for the geometry (those streaming kept in ``known``, a
    :class:`~storage.volumes.HeaderCache`, are not read again). ``None`` when the series
    cannot be read this way (multi-frame objects; a model that sees whole volumes)."""
    import numpy as np
    import torch

    from models.msvlm import EncodedView
    from storage.volumes import (HeaderCache, VolumeError, is_multiframe,
                                 read_series_headers, read_slice)

    if not generator.streamable:
        return None
    known = known if known is not None else HeaderCache(len(files))
    start = time.perf_counter()
    missing = [p for p in files if p not in hits]
    fresh: dict[Path, bytes] = {}
    modality = None
    for chunk in range(0, len(missing), 32):  # at most 32 slices of pixels in memory
        part = missing[chunk:chunk + 32]
        pixels = [read_slice(p, known) for p in part]
        kept = [known.get(p) for p in part]
        if any(h is None or is_multiframe(h) for h in kept):
            return None  # read whole (multi-frame objects; a header not kept)
        modality = modality or str(kept[0].Modality)  # type: ignore[union-attr]
        if len({x.shape for x in pixels}) != 1:
            raise VolumeError("slices of different sizes")
        timings["load_s"] += time.perf_counter() - start
        start = time.perf_counter()
        fresh.update(zip(part, generator.stream_records(np.stack(pixels), modality)))
        timings["encode_s"] += time.perf_counter() - start
        start = time.perf_counter()
    try:
        ordered, view_headers, z = read_series_headers(files, known)
    except VolumeError as exc:
        if "multi-frame" in str(exc):
            return None
        raise
    first = view_headers[0]
    records = [fresh[p] if p in fresh else hits[p] for p in ordered]
    timings["load_s"] += time.perf_counter() - start
    start = time.perf_counter()
    spacing = [float(v) for v in first.PixelSpacing]
    phase = classify.phase(first)
    plane = classify.plane(first).value
    embeddings, sites = generator.streamed_view(records, np.asarray(z), (spacing[0], spacing[1]),
                                                (int(first.Rows), int(first.Columns)), phase,
                                                plane)
    timings["encode_s"] += time.perf_counter() - start
    view = EncodedView(embeddings, torch.as_tensor(z, dtype=torch.float32), str(first.Modality),
                       plane, phase, str(first.SeriesInstanceUID), sites)
    return [(view, view_headers)]
