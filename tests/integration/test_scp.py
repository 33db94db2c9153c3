"""A real SCP in this process on loopback, with pynetdicom and dcmtk as senders."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from node.config import Config
from node.service import Node, wait_for_index
from tests.conftest import copy_series, dcmtk
from tests.samples import CHARSET_FILES, STORESCU_PROPOSE, Samples, transfer_syntax

pytestmark = pytest.mark.integration


def associate(node: Node, calling: str = "SENDER", called: str = "MSVLM",
              contexts: list[Any] | None = None, bind: str = "127.0.0.1") -> Any:
    ae = AE(ae_title=calling)
    for cx in [Verification, *(contexts or [])]:
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", node.port, ae_title=called, bind_address=(bind, 0))


def storescu(node: Node, *paths: Path, calling: str = "STORESCU",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", "MSVLM", *extra, "127.0.0.1",
         str(node.port), *map(str, paths)],
        capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1"})


def test_echo_pynetdicom_and_dcmtk(make_config: Callable[..., Config],
                                   start_node: Callable[..., Node]) -> None:
    node = start_node(make_config())
    assoc = associate(node)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    result = subprocess.run([dcmtk("echoscu"), "-aec", "MSVLM", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def ct_file(built_samples: Samples) -> Path:
    return built_samples.ct_files[0]


def test_ct_series_twice_is_134_instances_one_axial_series(
        samples: Samples, make_config: Callable[..., Config],
        start_node: Callable[..., Node]) -> None:
    files = samples.ct_files
    assert len(files) == 134
    node = start_node(make_config())
    for _ in range(2):
        result = storescu(node, *files)
        assert result.returncode == 0, result.stderr
    assert node.index is not None
    assert wait_for_index(node.index, 134)
    node.indexer.run_once()  # type: ignore[union-attr]
    assert node.index.instance_count() == 134
    [study] = node.index.studies()
    assert study.instance_count == 134 and study.series_count == 1
    assert study.planes == ["axial"] and study.modalities == ["CT"]
    [series] = node.index.series(study.study_instance_uid)
    assert series.plane == "axial" and series.instance_count == 134 and not series.is_localizer
    instances = node.index.instances(series.series_instance_uid)
    positions = [i.position_mm for i in instances]
    assert positions == sorted(positions) and len(set(positions)) == 134
    assert {i.calling_ae_title for i in instances} == {"STORESCU"}
    assert {i.source_address for i in instances} == {"127.0.0.1"} or all(
        a.startswith("127.0.0.1:") for a in {i.source_address for i in instances})
    # stored as received: byte-identical data set (at least its second half, pixels included)
    original = files[0].read_bytes()
    stored = [i for i in instances
              if i.sop_instance_uid == pydicom.dcmread(files[0]).SOPInstanceUID][0]
    stored_bytes = (node.config.storage.root / stored.path).read_bytes()
    assert stored_bytes.endswith(original[-min(400_000, len(original) // 2):])


def test_every_transfer_syntax_stored_as_sent_and_decoded(
        samples: Samples, make_config: Callable[..., Config],
        start_node: Callable[..., Node]) -> None:
    files = samples.mr_files
    syntaxes = {transfer_syntax(f) for f in files}
    if samples.kind == "shared":  # the real set: two files each of JPEG Lossless SV1, JPEG-LS
        assert len(files) == 9 and len(syntaxes) == 7
    elif os.access("/usr/bin/dcmcjpeg", os.X_OK):  # every syntax the conformance statement claims
        assert len(files) == len(syntaxes) == 13
    node = start_node(make_config())
    for f in files:  # one association each, proposing the file's own syntax (no conversion)
        option = STORESCU_PROPOSE[transfer_syntax(f)]
        if option is None:  # no storescu option (JPEG Lossless Process 14): pynetdicom sends
            ds = pydicom.dcmread(f)
            ae = AE(ae_title="STORESCU")
            ae.add_requested_context(ds.SOPClassUID, [transfer_syntax(f)])
            assoc = ae.associate("127.0.0.1", node.port, ae_title="MSVLM")
            assert assoc.is_established and assoc.send_c_store(ds).Status == 0, f.name
            assoc.release()
        else:
            result = storescu(node, f, extra=(option,))
            assert result.returncode == 0, (f.name, result.stderr)
    assert node.index is not None and wait_for_index(node.index, len(files))
    [study] = node.index.studies()
    [series] = node.index.series(study.study_instance_uid)
    instances = node.index.instances(series.series_instance_uid)
    assert {i.transfer_syntax_uid for i in instances} == syntaxes  # stored as received
    reference = pydicom.dcmread(files[0]).pixel_array.astype(np.float64)
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f.name
              for f in files}
    for instance in instances:
        pixels = pydicom.dcmread(node.config.storage.root / instance.path).pixel_array
        name = by_uid[instance.sop_instance_uid]
        if name in samples.lossy:  # lossy syntaxes: the same image, within the codec's error
            assert np.corrcoef(pixels.ravel(), reference.ravel())[0, 1] > 0.99, name
        else:
            np.testing.assert_array_equal(pixels, reference, err_msg=name)


def test_policy_rejections(make_config: Callable[..., Config],
                           start_node: Callable[..., Node]) -> None:
    config = make_config(node={"accept_unknown_peers": False},
                         peers__ct={"ae_title": "CT01", "host": "127.0.0.1", "port": 104},
                         peers__remote={"ae_title": "REMOTE", "host": "127.0.0.2", "port": 104},
                         peers__viewer={"ae_title": "VIEWER", "host": "127.0.0.1", "port": 104,
                                        "allow_store": False})
    node = start_node(config)

    def rejection(**kwargs: str) -> tuple[int, int, int] | None:
        assoc = associate(node, **kwargs)
        if assoc.is_established:
            assoc.release()
            return None
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        return (rj.result, rj.result_source, int(rj.diagnostic))

    assert rejection(calling="CT01") is None
    assert rejection(calling="STRANGER") == (1, 1, 3)  # calling AE title not recognised
    assert rejection(calling="REMOTE") == (1, 1, 3)  # known AE, wrong source address
    assert rejection(calling="REMOTE", bind="127.0.0.2") is None
    assert rejection(calling="VIEWER") == (1, 1, 3)  # may not store to us
    assert rejection(calling="CT01", called="OTHER") == (1, 1, 7)  # called AE not recognised


def test_max_associations(make_config: Callable[..., Config],
                          start_node: Callable[..., Node]) -> None:
    node = start_node(make_config(node={"max_associations": 1}))
    first = associate(node)
    assert first.is_established
    second = associate(node, bind="127.0.0.2")  # another address: the node-wide limit answers
    assert second.is_rejected
    rj = second.acceptor.primitive
    assert (rj.result, rj.result_source, int(rj.diagnostic)) == (2, 3, 2)
    first.release()
    deadline = time.monotonic() + 5  # the released association's thread ends shortly after
    third = associate(node)
    while not third.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
        third = associate(node)
    assert third.is_established
    third.release()


def _ct_dataset(path: Path, **changes: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def test_bad_uids_refused_and_nothing_written_outside_root(
        make_config: Callable[..., Config], start_node: Callable[..., Node],
        tmp_path: Path, ct_file: Path) -> None:
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    node = start_node(make_config())
    before = {p for p in tmp_path.parent.rglob("*")}
    assoc = associate(node, contexts=[CTImageStorage])
    for changes in ({"StudyInstanceUID": "../../../../x"},
                    {"SeriesInstanceUID": "1.2/../../../y"},
                    {"StudyInstanceUID": "1." + "2" * 70}):
        rsp = assoc.send_c_store(_ct_dataset(ct_file, **changes))
        assert rsp.Status == 0xC210, changes
        assert "Invalid" in rsp.ErrorComment
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    after = {p for p in tmp_path.parent.rglob("*")}
    new = {p for p in after - before if not str(p).startswith(str(tmp_path))}
    assert new == set()
    assert list((node.config.storage.root / "incoming").iterdir()) == []
    assert node.index is not None and node.index.instance_count() == 0


def test_odd_files_each_answered_and_node_keeps_serving(
        samples: Samples, make_config: Callable[..., Config],
        start_node: Callable[..., Node]) -> None:
    files = samples.odd_files
    assert len(files) == 6
    node = start_node(make_config())
    for f in files:
        ds = pydicom.dcmread(f, force=True)
        if "TransferSyntaxUID" not in ds.file_meta:  # no file meta: send as it was read
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = (
                pydicom.uid.ImplicitVRLittleEndian if implicit
                else pydicom.uid.ExplicitVRLittleEndian if little
                else pydicom.uid.ExplicitVRBigEndian)
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MSVLM")
        assert assoc.is_established, f.name
        rsp = assoc.send_c_store(ds)
        assert "Status" in rsp, f.name  # a status for every file
        assoc.release()
        echo = associate(node)  # and the next association is still served
        assert echo.is_established and echo.send_c_echo().Status == 0
        echo.release()
    assert node.index is not None and wait_for_index(node.index, 6)
    # the non-ASCII patient names survive byte for byte
    for name in CHARSET_FILES:
        original = pydicom.dcmread(samples.odd_dir / name)
        [instance] = [i for s in node.index.studies() for se in node.index.series(
            s.study_instance_uid) for i in node.index.instances(se.series_instance_uid)
            if i.sop_instance_uid == original.SOPInstanceUID]
        stored = pydicom.dcmread(node.config.storage.root / instance.path)
        assert stored.PatientName == original.PatientName
        assert stored.SpecificCharacterSet == original.SpecificCharacterSet


def test_dcmtk_odd_files_with_storescu(samples: Samples, make_config: Callable[..., Config],
                                       start_node: Callable[..., Node]) -> None:
    node = start_node(make_config())
    for f in samples.odd_files:
        result = storescu(node, f, extra=("-R", "+f") if "NoMeta" in f.name else ("-R",))
        # storescu exits 0 when the store completed with any status it could read
        assert "Association Request Failed" not in result.stderr, (f.name, result.stderr)
    result = subprocess.run([dcmtk("echoscu"), "-aec", "MSVLM", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0


@pytest.mark.parametrize("policy, status, kept", [
    ("keep", 0x0000, "first"), ("reject", 0x0111, "first"), ("overwrite", 0x0000, "second")])
def test_duplicate_policy(make_config: Callable[..., Config], start_node: Callable[..., Node],
                          policy: str, status: int, kept: str, ct_file: Path) -> None:
    node = start_node(make_config(storage={"duplicate_policy": policy}))
    first = _ct_dataset(ct_file)
    second = _ct_dataset(ct_file, SeriesDescription="CHANGED")
    assoc = associate(node, contexts=[CTImageStorage])
    assert assoc.send_c_store(first).Status == 0
    assert assoc.send_c_store(first).Status == 0  # identical bytes: always a no-op Success
    assert assoc.send_c_store(second).Status == status
    assoc.release()
    assert node.index is not None and wait_for_index(node.index, 1)
    node.indexer.run_once()  # type: ignore[union-attr]
    [study] = node.index.studies()
    [series] = node.index.series(study.study_instance_uid)
    [instance] = node.index.instances(series.series_instance_uid)
    stored = pydicom.dcmread(node.config.storage.root / instance.path, stop_before_pixels=True)
    expected = first if kept == "first" else second
    assert stored.SeriesDescription == expected.SeriesDescription


def test_low_disk_answers_a700_and_keeps_serving(make_config: Callable[..., Config],
                                                 start_node: Callable[..., Node],
                                                 ct_file: Path) -> None:
    node = start_node(make_config(storage={"min_free_bytes": 2**62}))
    assoc = associate(node, contexts=[CTImageStorage])
    rsp = assoc.send_c_store(_ct_dataset(ct_file))
    assert rsp.Status == 0xA700
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert list((node.config.storage.root / "incoming").iterdir()) == []


def test_unwritable_spool_answers_a7xx(make_config: Callable[..., Config],
                                       start_node: Callable[..., Node], ct_file: Path) -> None:
    node = start_node(make_config())
    incoming = node.config.storage.root / "incoming"
    incoming.rename(incoming.with_name("incoming-moved"))
    incoming.write_text("not a folder")  # rename into it fails with ENOTDIR
    try:
        assoc = associate(node, contexts=[CTImageStorage])
        rsp = assoc.send_c_store(_ct_dataset(ct_file))
        assert 0xA700 <= rsp.Status <= 0xA7FF
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        incoming.unlink()
        incoming.with_name("incoming-moved").rename(incoming)


def test_four_senders_at_once(make_config: Callable[..., Config],
                              start_node: Callable[..., Node], tmp_path: Path,
                              built_samples: Samples) -> None:
    files = built_samples.ct_files[:20]
    folders = [tmp_path / f"series{i}" for i in range(4)]
    for i, folder in enumerate(folders):
        copy_series(files, folder, str(i))
    node = start_node(make_config())
    procs = [subprocess.Popen(
        [dcmtk("storescu"), "-aet", f"SENDER{i}", "-aec", "MSVLM", "+sd", "127.0.0.1",
         str(node.port), str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"TCP_NODELAY": "1"}) for i, folder in enumerate(folders)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    assert node.index is not None and wait_for_index(node.index, 80)
    [study] = node.index.studies()
    assert study.series_count == 4 and study.instance_count == 80


def test_sop_instance_uid_mismatch_answers_a900(make_config: Callable[..., Config],
                                                start_node: Callable[..., Node],
                                                ct_file: Path) -> None:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    node = start_node(make_config())
    assoc = associate(node, contexts=[CTImageStorage])
    ds = _ct_dataset(ct_file)
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = generate_uid()  # not the data set's SOP Instance UID
    request.Priority = 2
    context = assoc._get_valid_context(CTImageStorage, "", "scu")
    request.DataSet = BytesIO(encode(ds, context.transfer_syntax[0].is_implicit_VR,
                                     context.transfer_syntax[0].is_little_endian))
    assoc._reactor_checkpoint.clear()  # pause the requestor's reactor, as send_c_store does
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert response.Status == 0xA900
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_slowloris_address_cannot_lock_out_a_scanner(
        make_config: Callable[..., Config], start_node: Callable[..., Node],
        built_samples: Samples) -> None:
    import socket

    config = make_config(node={"accept_unknown_peers": False, "max_associations": 8,
                               "max_associations_per_address": 3, "acse_timeout_s": 3},
                         peers__ct={"ae_title": "CT01", "host": "127.0.0.1", "port": 104})
    node = start_node(config)
    greedy = []
    for _ in range(40):  # from 127.0.0.2: connect, send nothing, hold on
        s = socket.create_connection(("127.0.0.1", node.port), source_address=("127.0.0.2", 0))
        s.settimeout(0.5)
        greedy.append(s)

    def closed_by_node(s: socket.socket) -> bool:
        try:
            return s.recv(1) == b""
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    held = [s for s in greedy if not closed_by_node(s)]
    assert len(held) == 3  # the rest were closed at once, before any PDU
    result = storescu(node, *built_samples.ct_files[:20], calling="CT01")
    assert result.returncode == 0, result.stderr
    assert node.index is not None and wait_for_index(node.index, 20)
    # the silent ones are closed by the node after acse_timeout_s; then the address is heard
    # again (an unknown AE title there: a proper A-ASSOCIATE-RJ, not a closed connection)
    for s in held:
        s.settimeout(10)
        assert closed_by_node(s)
    for s in greedy:
        s.close()
    deadline = time.monotonic() + 5
    while True:
        again = associate(node, calling="STRANGER", bind="127.0.0.2")
        if again.is_rejected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert again.is_rejected and int(again.acceptor.primitive.diagnostic) == 3


def test_audit_trail_of_accepted_and_rejected_associations(
        make_config: Callable[..., Config], start_node: Callable[..., Node],
        built_samples: Samples) -> None:
    import json

    config = make_config(node={"accept_unknown_peers": False},
                         peers__ct={"ae_title": "CT01", "host": "127.0.0.1", "port": 104})
    node = start_node(config)
    files = built_samples.ct_files[:5]
    result = storescu(node, *files, calling="CT01")
    assert result.returncode == 0, result.stderr
    stranger = associate(node, calling="STRANGER")
    assert stranger.is_rejected
    audit = config.storage.root / "audit.jsonl"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and audit.read_text().count("\n") < 2:
        time.sleep(0.05)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    [accepted] = [d for d in lines if d["event"] == "association" and d["accepted"]]
    assert (accepted["calling"], accepted["called"], accepted["ended"]) == ("CT01", "MSVLM",
                                                                           "released")
    assert accepted["stored"] == 5 and accepted["statuses"] == {"0x0000": 5}
    assert accepted["studies"] == [built_samples.ct_study_uid]
    assert accepted["bytes"] > 5 * 64 * 64 * 2 and accepted["duration_s"] > 0
    [rejected] = [d for d in lines if d["event"] == "association" and not d["accepted"]]
    assert rejected["calling"] == "STRANGER" and rejected["rejection"] == [1, 1, 3]
    assert "calling AE title" in rejected["reason"]
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    text = audit.read_text()  # never PHI
    assert str(header.PatientName) not in text and str(header.PatientID) not in text
