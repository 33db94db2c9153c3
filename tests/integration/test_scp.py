"""A real SCP in this process on loopback, with pynetdicom and dcmtk as senders."""

from __future__ import annotations

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
from tests.conftest import (
    MR_TS_DIR, ODD_DIR, copy_series, ct_files, dcmtk, samples_or_skip,
)

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


def test_real_ct_series_twice_is_134_instances_one_axial_series(
        make_config: Callable[..., Config], start_node: Callable[..., Node]) -> None:
    files = ct_files()
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
    # stored as received: byte-identical data set
    original = files[0].read_bytes()
    stored = [i for i in instances
              if i.sop_instance_uid == pydicom.dcmread(files[0]).SOPInstanceUID][0]
    stored_bytes = (node.config.storage.root / stored.path).read_bytes()
    assert stored_bytes.endswith(original[-400_000:])


def test_nine_transfer_syntaxes_stored_and_decoded_identically(
        make_config: Callable[..., Config], start_node: Callable[..., Node]) -> None:
    files = sorted(samples_or_skip(MR_TS_DIR).glob("*.dcm"))
    assert len(files) == 9
    node = start_node(make_config())
    # dcmtk's option that proposes each file's own transfer syntax (no conversion)
    propose = {"1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2": "-xi",
               "1.2.840.10008.1.2.2": "-xb", "1.2.840.10008.1.2.5": "-xr",
               "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt",
               "1.2.840.10008.1.2.4.90": "-xv"}
    for f in files:  # one association each
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        result = storescu(node, f, extra=(propose[ts],))
        assert result.returncode == 0, result.stderr
    assert node.index is not None and wait_for_index(node.index, 9)
    [study] = node.index.studies()
    [series] = node.index.series(study.study_instance_uid)
    instances = node.index.instances(series.series_instance_uid)
    syntaxes = {i.transfer_syntax_uid for i in instances}
    assert syntaxes == {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                        for f in files}
    assert len(syntaxes) == 7  # two files each of JPEG Lossless SV1 and JPEG-LS lossless
    reference = pydicom.dcmread(files[0]).pixel_array
    for instance in instances:
        pixels = pydicom.dcmread(node.config.storage.root / instance.path).pixel_array
        np.testing.assert_array_equal(pixels, reference)


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
    second = associate(node)
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


def _ct_dataset(**changes: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(ct_files()[0])
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def test_bad_uids_refused_and_nothing_written_outside_root(
        make_config: Callable[..., Config], start_node: Callable[..., Node],
        tmp_path: Path) -> None:
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    node = start_node(make_config())
    before = {p for p in tmp_path.parent.rglob("*")}
    assoc = associate(node, contexts=[CTImageStorage])
    for changes in ({"StudyInstanceUID": "../../../../x"},
                    {"SeriesInstanceUID": "1.2/../../../y"},
                    {"StudyInstanceUID": "1." + "2" * 70}):
        rsp = assoc.send_c_store(_ct_dataset(**changes))
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
        make_config: Callable[..., Config], start_node: Callable[..., Node]) -> None:
    files = sorted(samples_or_skip(ODD_DIR).glob("*.dcm"))
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
    for name in ("chrArab.dcm", "chrH31.dcm", "chrJapMulti.dcm"):
        original = pydicom.dcmread(ODD_DIR / name)
        [instance] = [i for s in node.index.studies() for se in node.index.series(
            s.study_instance_uid) for i in node.index.instances(se.series_instance_uid)
            if i.sop_instance_uid == original.SOPInstanceUID]
        stored = pydicom.dcmread(node.config.storage.root / instance.path)
        assert stored.PatientName == original.PatientName
        assert stored.SpecificCharacterSet == original.SpecificCharacterSet


def test_dcmtk_odd_files_with_storescu(make_config: Callable[..., Config],
                                       start_node: Callable[..., Node]) -> None:
    node = start_node(make_config())
    for f in sorted(samples_or_skip(ODD_DIR).glob("*.dcm")):
        result = storescu(node, f, extra=("-R", "+f") if "NoMeta" in f.name else ("-R",))
        # storescu exits 0 when the store completed with any status it could read
        assert "Association Request Failed" not in result.stderr, (f.name, result.stderr)
    result = subprocess.run([dcmtk("echoscu"), "-aec", "MSVLM", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0


@pytest.mark.parametrize("policy, status, kept", [
    ("keep", 0x0000, "first"), ("reject", 0x0111, "first"), ("overwrite", 0x0000, "second")])
def test_duplicate_policy(make_config: Callable[..., Config], start_node: Callable[..., Node],
                          policy: str, status: int, kept: str) -> None:
    node = start_node(make_config(storage={"duplicate_policy": policy}))
    first = _ct_dataset()
    second = _ct_dataset(SeriesDescription="CHANGED")
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
                                                 start_node: Callable[..., Node]) -> None:
    node = start_node(make_config(storage={"min_free_bytes": 2**62}))
    assoc = associate(node, contexts=[CTImageStorage])
    rsp = assoc.send_c_store(_ct_dataset())
    assert rsp.Status == 0xA700
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert list((node.config.storage.root / "incoming").iterdir()) == []


def test_unwritable_spool_answers_a7xx(make_config: Callable[..., Config],
                                       start_node: Callable[..., Node]) -> None:
    node = start_node(make_config())
    incoming = node.config.storage.root / "incoming"
    incoming.rename(incoming.with_name("incoming-moved"))
    incoming.write_text("not a folder")  # rename into it fails with ENOTDIR
    try:
        assoc = associate(node, contexts=[CTImageStorage])
        rsp = assoc.send_c_store(_ct_dataset())
        assert 0xA700 <= rsp.Status <= 0xA7FF
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        incoming.unlink()
        incoming.with_name("incoming-moved").rename(incoming)


def test_four_senders_at_once(make_config: Callable[..., Config],
                              start_node: Callable[..., Node], tmp_path: Path) -> None:
    files = ct_files()[:20]
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
                                                start_node: Callable[..., Node]) -> None:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    node = start_node(make_config())
    assoc = associate(node, contexts=[CTImageStorage])
    ds = _ct_dataset()
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
