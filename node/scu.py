"""The node as an SCU: C-ECHO and C-STORE to a configured peer or a host:port."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Config

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation context IDs are odd numbers 1..255


@dataclass(frozen=True)
class Target:
    """Where to connect: a configured peer or an ad-hoc ``host:port``."""

    name: str
    ae_title: str
    host: str
    port: int


def resolve_target(config: Config, text: str, called_ae_title: str | None = None) -> Target:
    """A peer name from ``[peers]`` or ``host:port``; raise ``ValueError`` otherwise."""
    if text in config.peers:
        peer = config.peers[text]
        return Target(text, called_ae_title or peer.ae_title, peer.host, peer.port)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        known = ", ".join(sorted(config.peers)) or "none configured"
        raise ValueError(f"Invalid target {text!r} - not a peer name ({known}) nor HOST:PORT")
    return Target(text, called_ae_title or "ANY-SCP", host.strip("[]"), int(port))


def _ae(config: Config) -> AE:
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = config.node.acse_timeout_s
    ae.dimse_timeout = config.node.dimse_timeout_s
    ae.network_timeout = config.node.network_timeout_s
    return ae


def echo(config: Config, target: Target) -> tuple[int | None, float]:
    """C-ECHO; returns (status or ``None`` when no association, seconds)."""
    ae = _ae(config)
    ae.add_requested_context(Verification)
    start = time.perf_counter()
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        return None, time.perf_counter() - start
    try:
        rsp = assoc.send_c_echo()
        status = int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()
    return status, time.perf_counter() - start


def iter_dicom_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files named on the command line, and every file under named folders (sorted)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for dirpath, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(dirpath) / name
        else:
            yield path


@dataclass
class SendSummary:
    """Outcome of ``send``: statuses counted, plus the files that were not stored."""

    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def send(config: Config, target: Target, paths: Iterable[str | os.PathLike[str]]) -> SendSummary:
    """C-STORE every DICOM file under ``paths`` to ``target``, as stored (no re-encoding).

    Files are grouped by (SOP class, transfer syntax); each group of up to 128 such pairs goes
    over one association. Unreadable files are reported, not sent.
    """
    summary = SendSummary()
    items: list[tuple[Path, str, str, bool]] = []
    for path in iter_dicom_files(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            sop_class = str(ds.SOPClassUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as exc:
            summary.statuses["not DICOM"] += 1
            summary.failures.append((path, f"not sent: {type(exc).__name__}"))
            continue
        meta_ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        ts = str(meta_ts) if meta_ts else ("1.2.840.10008.1.2" if ds.is_implicit_VR
                                           else "1.2.840.10008.1.2.1")
        items.append((path, sop_class, ts, bool(meta_ts)))
    pairs = sorted({(sop, ts) for _, sop, ts, _ in items})
    for start in range(0, len(pairs), MAX_CONTEXTS):
        group = set(pairs[start:start + MAX_CONTEXTS])
        ae = _ae(config)
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in sorted(group)]
        batch = [item for item in items if (item[1], item[2]) in group]
        assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
        if not assoc.is_established:
            for path, *_ in batch:
                summary.statuses["association failed"] += 1
                summary.failures.append((path, "association rejected or aborted"))
            continue
        try:
            for path, _sop, _ts, has_meta in batch:
                dataset = str(path) if has_meta else pydicom.dcmread(path, force=True)
                try:
                    rsp = assoc.send_c_store(dataset)
                except (ValueError, AttributeError, OSError) as exc:
                    summary.statuses["not sent"] += 1
                    summary.failures.append((path, f"not sent: {exc}"))
                    continue
                if "Status" not in rsp:
                    summary.statuses["no response"] += 1
                    summary.failures.append((path, "no response (association lost)"))
                    if not assoc.is_established:
                        break
                    continue
                code = int(rsp.Status)
                label = f"0x{code:04X}"
                summary.statuses[label] += 1
                if code != 0 and not 0xB000 <= code <= 0xBFFF and code != 0x0107:
                    comment = rsp.get("ErrorComment", "")
                    summary.failures.append((path, f"{label} {comment}".strip()))
        finally:
            if assoc.is_established:
                assoc.release()
    return summary
