"""Hostile bytes on the wire: a seeded fuzzer against a running ``msvlm-node serve``.

After every batch the node must answer C-ECHO, store a valid instance, hold every instance it
acknowledged byte for byte, have nothing half-written in its index or spool, and its memory must
stay within a stated bound (RSS printed before and after). A quick run is in the default suite;
``pytest -m slow -k fuzz`` runs the full one (2,400 cases). A failing batch's cases are written
as hex to a file named in the failure, to become a regression test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from node.config import Config
from storage.files import FileStore
from storage.index import Index
from tests.conftest import ServeProcess
from tests.fuzz import Case, Fuzzer, encode_dataset, run_case
from tests.samples import Samples

pytestmark = pytest.mark.integration

BATCH = 100
RSS_GROWTH_BOUND = 64 * 2**20
"""A receiving process may grow by at most this much over a fuzz run (64 MiB; threads' stacks
and the allocator's arenas settle within the first batches)."""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def indexed(index: Index) -> dict[str, Path]:
    out = {}
    for study in index.studies():
        for series in index.series(study.study_instance_uid):
            for instance in index.instances(series.series_instance_uid):
                out[instance.sop_instance_uid] = index.store.root / instance.path
    return out


def valid_store(port: int, template: pydicom.Dataset, number: int) -> tuple[str, bytes]:
    ds = template.copy()
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["fuzz check", str(number)])
    ae = AE(ae_title="CHECKER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MSVLM")
    assert assoc.is_established, "the node no longer accepts a valid association"
    assert assoc.send_c_echo().Status == 0x0000, "C-ECHO failed"
    assert assoc.send_c_store(ds).Status == 0x0000, "a valid C-STORE failed"
    assoc.release()
    return str(ds.SOPInstanceUID), encode_dataset(ds)


def fuzz(config: Config, proc: ServeProcess, template: pydicom.Dataset, seed: int, count: int,
         out: Path) -> None:
    port = config.node.port
    fuzzer = Fuzzer(template, seed)
    index = Index(config.storage.effective_database_url, FileStore(config.storage.root))
    kinds: dict[str, int] = {}
    uid, data = valid_store(port, template, -1)  # warm up: imports, first association
    acknowledged: dict[str, bytes] = {uid: data}
    sent: set[str] = {uid}
    rss_before = rss_bytes(proc.proc.pid)
    for start in range(0, count, BATCH):
        batch = fuzzer.cases(min(BATCH, count - start), start)
        try:
            for case in batch:
                kinds[case.kind] = kinds.get(case.kind, 0) + 1
                sent.update(case.sent)
                sent.update(case.maybe)
                try:
                    statuses = run_case(port, case)
                except ConnectionRefusedError:  # say whether it died and what it last logged
                    code = proc.proc.poll()
                    state = "running" if code is None else f"exited with {code}"
                    raise AssertionError(
                        f"the node stopped listening at case {case.number} ({state}); the "
                        f"end of its log:\n{proc.output()[-3000:]}")
                for uid, status in statuses.items():
                    if status == 0x0000 and uid in case.sent:
                        acknowledged[uid] = case.sent[uid]
            uid, data = valid_store(port, template, start)
            acknowledged[uid] = data
            sent.add(uid)
            check_storage(index, acknowledged, sent)
            assert proc.proc.poll() is None, "the node exited"
        except AssertionError as exc:
            dump = out / f"fuzz-failure-seed{seed}-cases{start}-{start + len(batch) - 1}.txt"
            dump.write_text("\n".join(c.hex() for c in batch))
            raise AssertionError(f"{exc}\n(seed {seed}, cases {start}..{start + len(batch) - 1}"
                                 f"; their bytes: {dump})") from None
    rss_after = rss_bytes(proc.proc.pid)
    print(f"fuzz seed {seed}: {count} cases ({len(kinds)} kinds), {len(acknowledged)} "
          f"instances acknowledged and stored exactly; RSS {rss_before / 2**20:.1f} MiB -> "
          f"{rss_after / 2**20:.1f} MiB (bound +{RSS_GROWTH_BOUND / 2**20:.0f} MiB)")
    assert rss_after - rss_before <= RSS_GROWTH_BOUND
    assert "Traceback" not in proc.output()


def check_storage(index: Index, acknowledged: dict[str, bytes], sent: set[str]) -> None:
    deadline = time.monotonic() + 15
    while True:
        files = indexed(index)
        if set(acknowledged) <= set(files) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    missing = set(acknowledged) - set(files)
    assert not missing, f"acknowledged but not in the index: {sorted(missing)[:3]}"
    for uid, data in acknowledged.items():
        assert files[uid].read_bytes().endswith(data), f"stored bytes differ for {uid}"
    strangers = set(files) - sent
    assert not strangers, f"indexed instances nobody sent complete: {sorted(strangers)[:3]}"
    for uid, path in files.items():
        pydicom.dcmread(path, stop_before_pixels=True)  # every indexed file is whole
    store = index.store
    assert not list(store.failed.iterdir()), "instances quarantined at indexing"
    pending = [p for p in store.pending()]
    assert not pending or time.sleep(1) or not store.pending(), "the spool does not drain"


def fuzz_config(make_config: Callable[..., Config]) -> Config:
    # timeouts short so that half-sent cases end quickly; limits high so that the fuzzer's
    # lingering connections from one address do not hide cases behind the per-address limit
    return make_config(node={"max_associations": 64, "max_associations_per_address": 64,
                             "acse_timeout_s": 2, "dimse_timeout_s": 2, "network_timeout_s": 2,
                             "receive_processes": 1})


def test_fuzz_quick(make_config: Callable[..., Config], serve: Callable[[Config], ServeProcess],
                    built_samples: Samples, tmp_path: Path) -> None:
    config = fuzz_config(make_config)
    fuzz(config, serve(config), pydicom.dcmread(built_samples.ct_files[0]), seed=1, count=300,
         out=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
def test_fuzz_full(make_config: Callable[..., Config], serve: Callable[[Config], ServeProcess],
                   built_samples: Samples, tmp_path: Path, seed: int) -> None:
    config = fuzz_config(make_config)
    fuzz(config, serve(config), pydicom.dcmread(built_samples.ct_files[0]), seed=seed,
         count=1200, out=tmp_path)


def test_a_fuzz_case_replays_identically(built_samples: Samples) -> None:
    template = pydicom.dcmread(built_samples.ct_files[0])
    first = [c.hex() for c in Fuzzer(template, 7).cases(50)]
    again = [c.hex() for c in Fuzzer(template, 7).cases(50)]
    assert first == again
    kinds = {Case.kind for Case in Fuzzer(template, 7).cases(400)}
    assert len(kinds) >= 30  # every mutation family shows up


def test_fuzz_regressions(make_config: Callable[..., Config],
                          serve: Callable[[Config], ServeProcess],
                          built_samples: Samples) -> None:
    """Cases the fuzzer found, kept as bytes: each once broke something."""
    from tests.fuzz import CT_CONTEXT, associate_rq, p_data, pdv, store_command

    config = fuzz_config(make_config)
    proc = serve(config)
    template = pydicom.dcmread(built_samples.ct_files[0])
    uid, data = Fuzzer(template, 11).instance()
    # 1. an unknown Command Field (0x7777) killed the connection's DUL thread with a KeyError
    # traceback on stderr; now the association is aborted and logged in one line
    unknown = Case(0, "regression/unknown-command", [associate_rq(), p_data(
        pdv(CT_CONTEXT, 0x03, store_command(uid, 1, CommandField=0x7777)),
        pdv(CT_CONTEXT, 0x02, data))])
    assert run_case(config.node.port, unknown) == {}
    # 2. a data set whose pixel data is shorter than its length says was stored and
    # acknowledged; now it is refused as not understood (0xC210), and nothing is stored
    short = Case(1, "regression/lying-pixel-length", [associate_rq(), p_data(
        pdv(CT_CONTEXT, 0x03, store_command(uid, 1)), pdv(CT_CONTEXT, 0x02, data[:-100]))])
    assert run_case(config.node.port, short) == {uid: 0xC210}
    checked, _ = valid_store(config.node.port, template, 1)
    index = Index(config.storage.effective_database_url, FileStore(config.storage.root))
    deadline = time.monotonic() + 10
    while checked not in indexed(index) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(indexed(index)) == {checked}
    log = proc.output()
    assert "Undecodable DIMSE message from 'FUZZER'@127.0.0.1 (KeyError): aborting" in log
    assert "Traceback" not in log and "Exception in thread" not in log
