"""Ingest benchmark: msvlm-node against Orthanc and dcmtk storescp, in one run.

Builds a 300-slice 512x512 CT series (from the real TCIA slices in ../shared/dicom-samples or
$MSVLM_SAMPLES, with new UIDs and positions; without them, a synthetic 512x512 volume written by
``storage.volumes``: same size per file) and four distinct 75-slice series, then for each receiver and case starts a fresh
receiver, sends with ``TCP_NODELAY=1 /usr/bin/storescu`` and times it; medians of ``--repeat``.

Cases: (a) one association, 300 slices; (b) four senders at once, one 75-slice series each.
The node answers Success only once an instance is durable (fsync + rename into the spool); the
time until the index holds every instance is printed too.

    .venv/bin/python bench/ingest.py [--repeat 3] [--work /tmp/msvlm-bench]
"""

from __future__ import annotations

import abc
import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
CT_DIR = Path(os.environ.get("MSVLM_SAMPLES") or ROOT.parent / "shared" / "dicom-samples") \
    / "ct-abdomen-tcia"
ENV = {**os.environ, "TCP_NODELAY": "1"}
MSVLM_NODE = str(Path(sys.executable).with_name("msvlm-node"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} never opened")


def build_series(dest: Path, count: int, tag: str) -> Path:
    """``count`` slices of 512x512 from the real CT, as one new series with 1 mm spacing."""
    sources = sorted(CT_DIR.glob("*.dcm"))
    dest.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=["bench-study"])
    series_uid = generate_uid(entropy_srcs=["bench-series", tag])
    if not sources:  # a fresh clone: a synthetic body of the same matrix
        import numpy as np

        sys.path.insert(0, str(ROOT))
        from storage.volumes import StudyInfo, write_ct_series

        rng = np.random.default_rng(len(tag))
        yy, xx = np.mgrid[:512, :512]
        body = np.where(((yy - 256) / 200) ** 2 + ((xx - 256) / 240) ** 2 < 1, 40.0, -1000.0)
        volume = (body + rng.normal(0, 20, (count, 512, 512))).astype(np.float32)
        write_ct_series(dest, volume, [400.0 + i for i in range(count)], (0.7, 0.7), "axial",
                        "non_contrast", StudyInfo(study_uid, "BENCH"),
                        series_instance_uid=series_uid)
        return dest
    for i in range(count):
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["bench", tag, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-275.0, -178.1, 400.0 + i]
        ds.save_as(dest / f"{i:04d}.dcm")
    return dest


class Receiver(abc.ABC):
    """A receiver under test: started fresh for every case and repeat."""

    name = ""
    ae_title = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @abc.abstractmethod
    def start(self) -> None:
        """Start the receiver and return once its port accepts connections."""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def indexed(self) -> int | None:
        return None


class Node(Receiver):
    name, ae_title = "msvlm-node", "MSVLM"
    stream = True  # --no-stream: the worker only drafts (the receive path alone)

    def start(self) -> None:
        cfg = self.work / "node.toml"
        cfg.write_text(f'[node]\nae_title = "MSVLM"\nbind_address = "127.0.0.1"\n'
                       f"port = {self.port}\naccept_unknown_peers = true\n"
                       f'[storage]\nroot = "{self.work / "store"}"\nmin_free_bytes = 0\n'
                       # streaming on (the default) and engaged for any body part, so the
                       # worker encodes slices while they arrive, as in a deployment
                       f'[worker]\nstream = {str(self.stream).lower()}\n'
                       f'[selection]\nbody_parts = ["*"]\n'
                       # metrics on, as deployed (counters in every process, a listener)
                       f'[metrics]\nlisten = "127.0.0.1:0"\n')
        self.proc = subprocess.Popen([MSVLM_NODE, "serve", "-c", str(cfg), "--log-level",
                                      "WARNING"], env=ENV)
        wait_port(self.port)
        # Deployed as is (completion scan, delivery, one model worker that streams): the
        # worker loads the checkpoint and warms its drafting path up at start-up; measure the
        # steady state after it.
        time.sleep(14)

    def indexed(self) -> int | None:
        db = self.work / "store" / "index.sqlite"
        with sqlite3.connect(db, timeout=30) as con:
            return int(con.execute("select count(*) from instance").fetchone()[0])


class Orthanc(Receiver):
    name, ae_title = "Orthanc", "ORTHANC"

    def start(self) -> None:
        self.http = free_port()
        cfg = self.work / "orthanc.json"
        cfg.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(self.work / "storage"),
            "IndexDirectory": str(self.work / "storage"), "DicomAet": "ORTHANC",
            "DicomPort": self.port, "HttpPort": self.http, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "StorageCompression": False, "Plugins": [],
        }))
        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", str(cfg)], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        wait_port(self.http)

    def indexed(self) -> int | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics") as r:
            return int(json.load(r)["CountInstances"])


class StoreSCP(Receiver):
    name, ae_title = "dcmtk storescp", "STORESCP"

    def start(self) -> None:
        out = self.work / "out"
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["/usr/bin/storescp", "-aet", "STORESCP", "-od", str(out),
                                      str(self.port)], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)


def storescu(receiver: Receiver, folder: Path, calling: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["/usr/bin/storescu", "-aet", calling, "-aec", receiver.ae_title,
                             "+sd", "127.0.0.1", str(receiver.port), str(folder)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_case(make: Callable[[Path], Receiver], folders: list[Path], count: int,
             work: Path) -> tuple[float, float | None]:
    """Send ``folders`` concurrently to a fresh receiver; (seconds to all answered, to indexed)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    receiver = make(work)
    receiver.start()
    time.sleep(0.5)
    try:
        start = time.perf_counter()
        procs = [storescu(receiver, f, f"SENDER{i}") for i, f in enumerate(folders)]
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"storescu to {receiver.name} failed: {err.decode()[-500:]}")
        answered = time.perf_counter() - start
        indexed_at = None
        if receiver.indexed() is not None:
            while (receiver.indexed() or 0) < count:
                time.sleep(0.01)
                if time.perf_counter() - start > 120:
                    raise RuntimeError(f"{receiver.name} never indexed {count} instances")
            indexed_at = time.perf_counter() - start
        return answered, indexed_at
    finally:
        receiver.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/msvlm-bench"))
    parser.add_argument("--no-stream", action="store_true",
                        help="the node's worker does not stream (receive path alone)")
    args = parser.parse_args()
    Node.stream = not args.no_stream
    data = args.work / "data"
    if not (data / "a300").exists():
        print("building 300 + 4x75 slices ...", flush=True)
        build_series(data / "a300", 300, "a")
        for i in range(4):
            build_series(data / f"b75-{i}", 75, f"b{i}")
    cases = {"(a) 1 association, 300 slices": [data / "a300"],
             "(b) 4 senders x 75 slices": [data / f"b75-{i}" for i in range(4)]}
    receivers: list[Callable[[Path], Receiver]] = [Node, Orthanc, StoreSCP]
    results: dict[tuple[str, str], list[float]] = {}
    index_times: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeat):
        for case, folders in cases.items():
            for make in receivers:  # interleaved, so drift hits every receiver alike
                answered, indexed = run_case(make, folders, 300, args.work / "run")
                name = make.name  # type: ignore[attr-defined]
                results.setdefault((case, name), []).append(300 / answered)
                if indexed is not None:
                    index_times.setdefault((case, name), []).append(300 / indexed)
                print(f"rep {rep + 1} {case:32s} {name:15s} {300 / answered:7.1f} inst/s",
                      flush=True)
    print(f"\nmedians of {args.repeat} (instances per second, Success answered)")
    print(f"{'case':32s} {'receiver':15s} {'inst/s':>8s} {'indexed/s':>10s} {'vs Orthanc':>11s}")
    for case in cases:
        orthanc = statistics.median(results[(case, "Orthanc")])
        for make in receivers:
            name = make.name  # type: ignore[attr-defined]
            rate = statistics.median(results[(case, name)])
            idx = index_times.get((case, name))
            idx_text = f"{statistics.median(idx):10.1f}" if idx else f"{'-':>10s}"
            print(f"{case:32s} {name:15s} {rate:8.1f} {idx_text} {rate / orthanc:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
