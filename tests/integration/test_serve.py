"""The console script as an admin uses it: serve, echo, send, studies, series, reindex, SIGKILL."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from node.config import Config
from tests.conftest import MSVLM_NODE, ROOT, ServeProcess, dcmtk, run_cli, wait_port
from tests.samples import Samples

pytestmark = pytest.mark.integration

def wait_for_instances(config: Config, count: int, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        out = run_cli("studies", "-c", str(config.path)).stdout
        if f" {count} " in out:
            return out
        time.sleep(0.3)
    raise AssertionError(f"index never showed {count} instances:\n{out}")


def test_console_script_end_to_end(samples: Samples, make_config: Callable[..., Config],
                                   serve: Callable[[Config], ServeProcess]) -> None:
    files = samples.ct_files
    config = make_config(node={"receive_processes": 2, "accept_unknown_peers": False},
                         peers__ct={"ae_title": "CT01", "host": "127.0.0.1", "port": 104})
    proc = serve(config)

    echo = run_cli("echo", "-c", str(config.path), f"127.0.0.1:{config.node.port}",
                   "--called-ae-title", "MSVLM")
    # our own AE title is not a [peers] entry: the node rejects us, and says so
    assert echo.returncode == 2 and "rejected" in echo.stdout

    result = subprocess.run([dcmtk("storescu"), "-aet", "CT01", "-aec", "MSVLM", "+sd", "+sp",
                             "*.dcm", "127.0.0.1", str(config.node.port), str(files[0].parent)],
                            capture_output=True, text=True, timeout=300,
                            env={"TCP_NODELAY": "1"})
    assert result.returncode == 0, result.stderr
    studies = wait_for_instances(config, 134)
    assert samples.ct_study_uid in studies and "axial" in studies and "CT" in studies
    series = run_cli("series", "-c", str(config.path), samples.ct_study_uid)
    assert series.returncode == 0
    assert "axial" in series.stdout and "134" in series.stdout and "CHEST" in series.stdout

    # logs carry study UID / AE / address, never the patient's name or ID
    log = proc.output()
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert "'CT01'@127.0.0.1" in log
    assert str(ds.PatientName) not in log and str(ds.PatientID) not in log

    # reindex rebuilds the index from the files alone
    proc.stop()
    (config.storage.root / "index.sqlite").unlink()
    for extra in ("index.sqlite-wal", "index.sqlite-shm"):
        (config.storage.root / extra).unlink(missing_ok=True)
    rebuilt = run_cli("reindex", "-c", str(config.path))
    assert rebuilt.returncode == 0 and "Reindexed 134" in rebuilt.stdout
    assert " 134 " in run_cli("studies", "-c", str(config.path)).stdout


def test_send_and_echo_commands_between_two_nodes(
        make_config: Callable[..., Config], serve: Callable[[Config], ServeProcess],
        tmp_path: Path, built_samples: Samples) -> None:
    receiver_cfg = make_config()
    serve(receiver_cfg)
    sender_dir = tmp_path / "sender"
    sender_dir.mkdir()
    sender_cfg_path = sender_dir / "config.toml"
    sender_cfg_path.write_text(
        f'[node]\nae_title = "SENDNODE"\nport = 11112\n'
        f'[storage]\nroot = "{sender_dir / "store"}"\n'
        f'[peers.archive]\nae_title = "MSVLM"\nhost = "127.0.0.1"\n'
        f"port = {receiver_cfg.node.port}\n")
    echo = run_cli("echo", "archive", "-c", str(sender_cfg_path))
    assert echo.returncode == 0 and "Success" in echo.stdout
    files = built_samples.ct_files[:10]
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    sent = run_cli("send", *map(str, files), str(junk), "--to", "archive",
                   "-c", str(sender_cfg_path))
    assert sent.returncode == 1  # one file was not DICOM, and the summary says so
    assert "0x0000: 10" in sent.stdout and "not DICOM: 1" in sent.stdout
    assert f"FAILED {junk}" in sent.stdout
    wait_for_instances(receiver_cfg, 10)
    unknown = run_cli("send", str(files[0]), "--to", "nowhere", "-c", str(sender_cfg_path))
    assert unknown.returncode == 2 and "not a peer name (archive)" in unknown.stderr


def test_sigkill_mid_ingest_loses_nothing_acknowledged(
        make_config: Callable[..., Config], serve: Callable[[Config], ServeProcess],
        built_samples: Samples) -> None:
    files = built_samples.ct_files
    config = make_config(node={"receive_processes": 2})
    proc = serve(config)
    acknowledged: list[str] = []
    stop_at = 60

    def sender() -> None:
        ae = AE(ae_title="KILLTEST")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2")
        assoc = ae.associate("127.0.0.1", config.node.port, ae_title="MSVLM")
        for f in files:
            try:
                rsp = assoc.send_c_store(f)
            except Exception:  # noqa: BLE001 - the node was killed
                return
            if "Status" not in rsp:
                return
            if rsp.Status == 0:
                acknowledged.append(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)

    thread = threading.Thread(target=sender)
    thread.start()
    while len(acknowledged) < stop_at and thread.is_alive():
        time.sleep(0.005)
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait()
    thread.join(timeout=60)
    assert stop_at <= len(acknowledged) < 134
    # the receiving children die with the parent: the port is free for the restart
    time.sleep(0.5)
    proc2 = serve(config)
    wait_port(config.node.port)
    deadline = time.monotonic() + 60
    from storage.files import FileStore
    from storage.index import Index
    index = Index(config.storage.effective_database_url, FileStore(config.storage.root))
    try:
        while time.monotonic() < deadline:
            with index.sessions() as session:
                from sqlalchemy import select

                from storage.schema import Instance
                stored = set(session.scalars(select(Instance.sop_instance_uid)))
            if set(acknowledged) <= stored:
                break
            time.sleep(0.2)
        assert set(acknowledged) <= stored
    finally:
        index.close()
    assert list((config.storage.root / "tmp").iterdir()) == []
    proc2.stop()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze missing (apt-get install systemd)")
    unit = (ROOT / "systemd" / "msvlm-node.service").read_text()
    script = shutil.which("msvlm-node") or MSVLM_NODE
    assert "ExecStart=/usr/local/bin/msvlm-node serve -c /etc/msvlm-node/config.toml" in unit
    for needed in ("ProtectSystem=strict", "NoNewPrivileges=true",
                   "SystemCallFilter=@system-service", "StateDirectory=msvlm-node",
                   "Restart=on-failure", "HF_HUB_OFFLINE=1", "User=msvlm-node"):
        assert needed in unit
    copy = tmp_path / "msvlm-node.service"
    copy.write_text(unit.replace("/usr/local/bin/msvlm-node", script))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "msvlm-node.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out |= {int(c) for c in text}
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_workers_never_outlive_their_node(make_config: Callable[..., Config],
                                          serve: Callable[[Config], ServeProcess]) -> None:
    config = make_config(worker={"processes": 2},
                         model={"checkpoint": "demo", "device": "cpu", "threads": 1})
    proc = serve(config)
    deadline = time.monotonic() + 20
    spawned: set[int] = set()
    while len(spawned) < 2 and time.monotonic() < deadline:  # the workers (and their helper)
        spawned = {c for c in children(proc.proc.pid)
                   if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")}
        time.sleep(0.1)
    assert len(spawned) >= 2
    proc.kill()  # SIGKILL while the workers are still loading the model
    deadline = time.monotonic() + 10
    while any(alive(p) for p in spawned) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in spawned if alive(p)], "worker processes outlived the node"


def test_worker_stopped_while_loading_exits_at_once(make_config: Callable[..., Config]) -> None:
    config = make_config(model={"checkpoint": "demo", "device": "cpu", "threads": 1})
    worker = subprocess.Popen([MSVLM_NODE, "worker", "-c", str(config.path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # importing torch and loading the checkpoint take longer than this
    start = time.monotonic()
    worker.terminate()
    assert worker.wait(timeout=10) == 0, worker.stderr.read().decode(errors="replace")[-2000:]
    assert time.monotonic() - start < 5


def test_sighup_reloads_peers_without_a_restart(make_config: Callable[..., Config],
                                                serve: Callable[[Config], ServeProcess],
                                                built_samples: Samples) -> None:
    config = make_config(node={"accept_unknown_peers": False, "receive_processes": 2},
                         peers__ct={"ae_title": "CT01", "host": "127.0.0.1", "port": 104})
    proc = serve(config)
    assert config.path is not None
    files = built_samples.ct_files[:3]

    def push(calling: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([dcmtk("storescu"), "-aet", calling, "-aec", "MSVLM", "127.0.0.1",
                               str(config.node.port), *map(str, files)], capture_output=True,
                              text=True, timeout=120, env={"TCP_NODELAY": "1"})

    assert push("CT02").returncode != 0  # not a peer yet: rejected
    pids = {proc.proc.pid} | children(proc.proc.pid)
    ae = AE(ae_title="CT01")  # an association accepted before the reload, still open after it
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    in_flight = ae.associate("127.0.0.1", config.node.port, ae_title="MSVLM")
    assert in_flight.is_established
    text = config.path.read_text() + (
        '\n[peers.ct2]\nae_title = "CT02"\nhost = "127.0.0.1"\nport = 104\n')
    config.path.write_text(text)
    proc.proc.send_signal(signal.SIGHUP)
    # each receiving process re-reads the file on its own SIGHUP, a moment after the serving
    # process: within the deadline the new peer must be accepted four times in a row, whichever
    # receiving process takes it (one early success proved only that one had reloaded)
    deadline, in_a_row = time.monotonic() + 15, 0
    while in_a_row < 4:
        assert time.monotonic() < deadline, "the new peer was never accepted by every process"
        in_a_row = in_a_row + 1 if push("CT02").returncode == 0 else 0
    assert "Configuration reloaded" in proc.output()
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    assert in_flight.send_c_store(ds).Status == 0x0000  # finished under the old rules
    in_flight.release()
    assert {proc.proc.pid} | children(proc.proc.pid) == pids  # no process restarted

    # a broken file is not applied: one error naming file, key and rule; the node serves on
    config.path.write_text(text + '\n[peers.bad]\nae_title = "AN_AE_TITLE_FAR_TOO_LONG"\n'
                                  'host = "127.0.0.1"\nport = 104\n')
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "Configuration not reloaded" not in proc.output():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    [error] = [line for line in proc.output().splitlines()
               if "Configuration not reloaded" in line]
    assert str(config.path) in error and "[peers.bad] ae_title" in error
    assert push("CT02").returncode == 0 and push("CT01").returncode == 0
    assert push("STRANGER").returncode != 0
    assert proc.proc.poll() is None

    # a key that needs a restart is left as it was, and said so
    moved = text.replace(f"port = {config.node.port}\n", f"port = {config.node.port + 1}\n", 1)
    assert moved != text
    config.path.write_text(moved)
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "needs a restart" not in proc.output():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "[node] port changed: needs a restart; left as it was" in proc.output()
    assert push("CT02").returncode == 0  # still on the old port, with the reloaded peers
    assert proc.stop() == 0  # SIGTERM: a clean stop, after all those reloads
    log = (config.storage.root.parent / "serve.log").read_text()
    assert "Traceback" not in log and log.rstrip().endswith("Stopped")
