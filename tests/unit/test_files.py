"""The file store writes atomically and durably, and only under its root."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from storage.files import FileStore, dataset_offset, file_meta_bytes

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SOP_UID = "1.2.3.4.5"


def test_written_file_is_a_valid_dicom_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientName = SOP_CLASS, SOP_UID, "Doe^J"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    from pydicom.filewriter import write_dataset

    ds_bytes = pydicom.filebase.DicomBytesIO()
    ds_bytes.is_little_endian, ds_bytes.is_implicit_VR = True, True
    write_dataset(ds_bytes, ds)
    raw = ds_bytes.getvalue()
    meta = file_meta_bytes(SOP_CLASS, SOP_UID, "1.2.840.10008.1.2", "CT01",
                           "dicom://127.0.0.1:4000", "MSVLM")
    path = store.write_incoming(SOP_UID, (meta, raw))
    assert path == tmp_path / "incoming" / f"{SOP_UID}.dcm"
    data = path.read_bytes()
    assert data[dataset_offset(data):] == raw
    stored = pydicom.dcmread(path)
    assert stored.PatientName == "Doe^J"
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert stored.file_meta.MediaStorageSOPInstanceUID == SOP_UID
    assert stored.file_meta.SourceApplicationEntityTitle == "CT01"
    assert stored.file_meta.SourcePresentationAddress == "dicom://127.0.0.1:4000"
    assert list(store.tmp.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        store.write_incoming(SOP_UID, (b"x" * 1000,))
    assert list(store.incoming.iterdir()) == []
    assert list(store.tmp.iterdir()) == []


def test_rewrite_replaces_whole_file_atomically(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write_incoming(SOP_UID, (b"a" * 10_000,))
    store.write_incoming(SOP_UID, (b"b" * 10,))
    assert store.incoming_path(SOP_UID).read_bytes() == b"b" * 10


@pytest.mark.parametrize("study, series, sop", [
    ("../../etc", "1.2", "1.3"), ("1.2", "..", "1.3"), ("1.2", "1.3", "../x"),
    ("1.2", "1.3", "/abs"),
])
def test_paths_only_from_valid_uids(tmp_path: Path, study: str, series: str, sop: str) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(ValueError):
        store.final_path(study, series, sop)
    if sop != "1.3":
        with pytest.raises(ValueError):
            store.write_incoming(sop, (b"x",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "failed", "incoming", "tmp"]


def test_cleanup_of_partial_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    (store.tmp / "123-1-1.part").write_bytes(b"partial")
    assert store.cleanup_tmp() == 1
    assert list(store.tmp.iterdir()) == []


def test_nodes_sharing_a_root_keep_their_own_spool(tmp_path: Path) -> None:
    """Two nodes on one root: each sees, drains and cleans only its own spool and partial
    files; the single-node layout beside them ignores both."""
    a, b, single = FileStore(tmp_path, "node-a"), FileStore(tmp_path, "node-b"), FileStore(tmp_path)
    a.write_incoming("1.2.3.1", (b"a",))
    b.write_incoming("1.2.3.2", (b"b",))
    a.write_release(1, ["1.2.3"])
    assert [p.name for p in a.pending()] == ["1.2.3.1.dcm"] and len(a.releases()) == 1
    assert [p.name for p in b.pending()] == ["1.2.3.2.dcm"] and b.releases() == []
    assert single.pending() == [] and single.releases() == []
    assert a.incoming == tmp_path / "incoming" / "node-a"
    (b.tmp / "7-1-1.part").write_bytes(b"partial")
    assert a.cleanup_tmp() == 0 and single.cleanup_tmp() == 0
    assert b.cleanup_tmp() == 1
