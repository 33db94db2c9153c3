"""The file store: every received instance becomes one file, written atomically and durably.

Layout under ``root``::

    tmp/                         files being written (never read)
    incoming/<sop>.dcm           durable, answered Success, not yet in the index
    tmp/<node_id>/, incoming/<node_id>/<sop>.dcm   the same per node, when several nodes
                                 share the root and the index (each drains only its own)
    data/<study>/<series>/<sop>.dcm   indexed instances
    failed/                      spooled files the indexer could not read (kept, logged)

A received instance is written to ``tmp/``, fsynced and renamed into ``incoming/``; only then is
Success answered. The indexer moves files from ``incoming/`` to ``data/`` after committing their
rows, so ``incoming/`` is the durable record of what still has to reach the index: start-up
reconciliation drains it, and ``reindex`` rebuilds everything from ``data/`` and ``incoming/``.
Paths are built only from UIDs that passed :func:`storage.uids.check_uid`.
"""

from __future__ import annotations

import logging
import json
import os
import struct
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from storage.uids import check_uid

logger = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1452.1.1"
"""Implementation Class UID written in the file meta of every stored file."""
IMPLEMENTATION_VERSION_NAME = "MSVLM_NODE_010"

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", 0x0002, group_elem)
    if vr in (b"OB", b"UR"):
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _pad(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                    source_ae_title: str | None = None, source_address: str | None = None,
                    receiving_ae_title: str | None = None) -> bytes:
    """Encode the preamble and File Meta Information (PS3.10 7.1) for one instance.

    Built directly rather than through pydicom's writer: this runs once per received instance,
    and the generic writer's validation and dispatch cost more than the rest of the receive path.
    The UIDs must already be validated. Who sent the instance is kept in the file itself
    (Source Application Entity Title, Source Presentation Address, Receiving AE Title), so the
    index can always be rebuilt from the files with that provenance.
    """
    body = b"".join([
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _pad(sop_class_uid, b"\x00")),
        _element(0x0003, b"UI", _pad(sop_instance_uid, b"\x00")),
        _element(0x0010, b"UI", _pad(transfer_syntax_uid, b"\x00")),
        _element(0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME, b" ")),
    ])
    if source_ae_title:
        body += _element(0x0016, b"AE", _pad(source_ae_title, b" "))
    if receiving_ae_title:
        body += _element(0x0018, b"AE", _pad(receiving_ae_title, b" "))
    if source_address:
        body += _element(0x0026, b"UR", _pad(source_address, b" "))
    return _PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def dataset_offset(head: bytes) -> int:
    """Offset of the data set in a file that starts with ``head`` (a preamble and file meta)."""
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        return 0
    (group_length,) = struct.unpack("<I", head[140:144])
    return 144 + group_length


class FileStore:
    """Atomic, durable file storage under one root folder.

    Parameters
    ----------
    root : path-like
        The storage root; the sub-folders are created if missing.
    node_id : str
        With several nodes on one root: this node's spool is ``incoming/<node_id>/`` and its
        partial files ``tmp/<node_id>/`` (each node drains and cleans only its own); ``data/``
        and ``failed/`` are shared. ``""``: ``incoming/`` and ``tmp/`` themselves.
    """

    def __init__(self, root: str | os.PathLike[str], node_id: str = "") -> None:
        self.root = Path(root)
        self.node_id = node_id
        self.tmp = self.root / "tmp" / node_id if node_id else self.root / "tmp"
        self.incoming = self.root / "incoming" / node_id if node_id else self.root / "incoming"
        self.data = self.root / "data"
        self.failed = self.root / "failed"
        for folder in (self.tmp, self.incoming, self.data, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        self._incoming_fd = os.open(self.incoming, os.O_RDONLY | os.O_DIRECTORY)
        self._lock = threading.Lock()
        self._counter = 0

    def close(self) -> None:
        os.close(self._incoming_fd)

    # -- paths ------------------------------------------------------------------------------------
    def final_path(self, study_instance_uid: str, series_instance_uid: str,
                   sop_instance_uid: str) -> Path:
        """Where an indexed instance lives; every UID is validated again here."""
        return (self.data / check_uid(study_instance_uid, "StudyInstanceUID")
                / check_uid(series_instance_uid, "SeriesInstanceUID")
                / f"{check_uid(sop_instance_uid, 'SOPInstanceUID')}.dcm")

    def incoming_path(self, sop_instance_uid: str) -> Path:
        return self.incoming / f"{check_uid(sop_instance_uid, 'SOPInstanceUID')}.dcm"

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    # -- writing ----------------------------------------------------------------------------------
    def write_incoming(self, sop_instance_uid: str,
                       parts: Sequence[bytes | memoryview]) -> Path:
        """Write one instance durably into ``incoming/`` and return its path.

        The bytes go to a temporary file that is fsynced and renamed, then the folder is fsynced,
        so after return the file survives a crash or power loss under its final name, and no
        reader ever sees a partial file.

        Raises
        ------
        OSError
            The write, fsync or rename failed (for example ``ENOSPC``); nothing is left behind.
        """
        target = self.incoming_path(sop_instance_uid)
        self._write(target, parts, self._incoming_fd)
        return target

    def write_final(self, study_instance_uid: str, series_instance_uid: str,
                    sop_instance_uid: str, data: bytes) -> Path:
        """Write an object the node made (its SR, PDF) straight to its place under ``data/``,
        durably; the caller indexes it. Returns the path."""
        target = self.final_path(study_instance_uid, series_instance_uid, sop_instance_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._write(target, [data], fd)
        finally:
            os.close(fd)
        return target

    def _write(self, target: Path, parts: Sequence[bytes | memoryview], dir_fd: int) -> None:
        with self._lock:
            self._counter += 1
            tmp = self.tmp / f"{os.getpid()}-{threading.get_ident()}-{self._counter}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, target)
            os.fsync(dir_fd)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def promote(self, incoming: Path, final: Path) -> None:
        """Move an indexed file from ``incoming/`` to its place under ``data/``."""
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(incoming, final)
        except FileNotFoundError:
            if not final.exists():
                raise  # not moved by a concurrent drain either


    def quarantine(self, path: Path) -> Path:
        """Move a spooled file the indexer cannot read to ``failed/`` (kept for inspection)."""
        target = self.failed / path.name
        os.replace(path, target)
        return target

    def sync_data(self, folders: Iterable[Path]) -> None:
        """fsync folders whose entries changed, so promotions survive a power loss."""
        for folder in set(folders) | {self.incoming}:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def write_release(self, closed_at_ns: int, study_instance_uids: Sequence[str]) -> Path:
        """Record, in the spool, that an association was released and no other association
        held these studies (the association completion cue). Written after every instance of
        that association is in ``incoming/``; the indexer applies it after them."""
        body = json.dumps({"closed_at_ns": closed_at_ns,
                           "studies": [check_uid(u, "StudyInstanceUID")
                                       for u in study_instance_uids]}).encode()
        with self._lock:
            self._counter += 1
            name = f"{closed_at_ns:020d}-{os.getpid()}-{self._counter}.released"
        target = self.incoming / name
        self._write(target, [body], self._incoming_fd)
        return target

    def releases(self) -> list[Path]:
        """Association release records not yet applied, oldest first."""
        return sorted(Path(e.path) for e in os.scandir(self.incoming)
                      if e.name.endswith(".released"))

    # -- reading ----------------------------------------------------------------------------------
    def pending(self) -> list[Path]:
        """Spooled files not yet indexed, oldest first."""
        entries = [e for e in os.scandir(self.incoming) if e.name.endswith(".dcm")]
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        return [Path(e.path) for e in entries]

    def existing(self, study_instance_uid: str, series_instance_uid: str,
                 sop_instance_uid: str) -> Path | None:
        """The stored file for this instance, indexed or still spooled, if any."""
        for path in (self.incoming_path(sop_instance_uid),
                     self.final_path(study_instance_uid, series_instance_uid, sop_instance_uid)):
            if path.exists():
                return path
        return None

    def iter_files(self) -> Iterator[Path]:
        """Every stored instance file, indexed or spooled."""
        yield from self.pending()
        for dirpath, _dirs, files in os.walk(self.data):
            for name in sorted(files):
                if name.endswith(".dcm"):
                    yield Path(dirpath) / name

    def cleanup_tmp(self) -> int:
        """Remove temporary files left by a crash; they were never answered Success."""
        removed = 0
        for entry in os.scandir(self.tmp):
            if entry.is_file(follow_symlinks=False):  # not another node's tmp/<node_id>/
                os.unlink(entry.path)
                removed += 1
        return removed
