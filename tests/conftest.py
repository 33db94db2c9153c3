"""Shared fixtures: configs in tmp folders, nodes in-process and as a subprocess, DICOM samples
(built here always; the real ones beside the repository when present)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from node.config import Config, load_config

from tests.samples import SHARED, Samples, build_samples, shared_samples

ROOT = Path(__file__).resolve().parents[1]
MSVLM_NODE = str(Path(sys.executable).with_name("msvlm-node"))
DCMTK = {name: f"/usr/bin/{name}" for name in ("storescu", "echoscu", "storescp")}


@pytest.fixture(scope="session")
def built_samples(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    """CT, MR in every claimed transfer syntax, odd files: built from phantoms (a few seconds)."""
    return build_samples(tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="session", params=["built", "shared"])
def samples(request: pytest.FixtureRequest, built_samples: Samples) -> Samples:
    """Each test that takes it runs on the built set and, where present, on the real files."""
    if request.param == "built":
        return built_samples
    real = shared_samples()
    if real is None:
        pytest.skip(f"real samples not found at {SHARED} (set MSVLM_SAMPLES)")
    return real


@pytest.fixture(scope="session")
def real_samples() -> Samples:
    real = shared_samples()
    if real is None:
        pytest.skip(f"real samples not found at {SHARED} (set MSVLM_SAMPLES)")
    return real


def dcmtk(name: str) -> str:
    path = DCMTK[name]
    if not os.access(path, os.X_OK):
        pytest.skip(f"{path} missing (apt-get install dcmtk)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value) + '"'


def write_config(folder: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a TOML config; ``sections`` maps ``"node"`` or ``"peers.X"`` to key/values."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path = folder / "config.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a valid node config in ``tmp_path``; keyword sections override the defaults."""

    def make(**sections: dict[str, Any]) -> Config:
        merged: dict[str, dict[str, Any]] = {
            "node": {"ae_title": "MSVLM", "bind_address": "127.0.0.1", "port": free_port(),
                     "accept_unknown_peers": True, "receive_processes": 1},
            "storage": {"root": str(tmp_path / "store"), "min_free_bytes": 0},
            "worker": {"processes": 0},  # receive-only unless a test asks for workers
        }
        for name, table in sections.items():
            merged.setdefault(name.replace("__", "."), {}).update(table)
        return load_config(write_config(tmp_path, merged))

    return make


@pytest.fixture
def start_node() -> Iterator[Callable[..., Any]]:
    """Start :class:`node.service.Node` in this process; stopped after the test."""
    from node.service import Node

    nodes: list[Node] = []

    def start(config: Config, processes: int = 1) -> Node:
        node = Node(config, processes=processes)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class ServeProcess:
    """``msvlm-node serve`` as a real subprocess (the console script)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = open(config.storage.root.parent / "serve.log", "ab")
        self.proc = subprocess.Popen([MSVLM_NODE, "serve", "-c", str(config.path)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(config.node.port)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return int(self.proc.wait())

    def output(self) -> str:
        self.log.flush()
        return (self.config.storage.root.parent / "serve.log").read_text(errors="replace")


@pytest.fixture
def serve() -> Iterator[Callable[[Config], ServeProcess]]:
    procs: list[ServeProcess] = []

    def start(config: Config) -> ServeProcess:
        proc = ServeProcess(config)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MSVLM_NODE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def copy_series(files: list[Path], dest: Path, series_suffix: str) -> list[Path]:
    """Copy CT files into ``dest`` as a distinct series (new Series/SOP Instance UIDs)."""
    import pydicom
    from pydicom.uid import generate_uid

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, series_suffix])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[ds.SOPInstanceUID, series_suffix])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = dest / f.name
        ds.save_as(path)
        out.append(path)
    return out


def which(name: str) -> str | None:
    return shutil.which(name)


def write_phantom_study(folder: Path, seed: int, phases: tuple[str, ...] = ("non_contrast",),
                        slices: int = 24, matrix: int = 48, localizer: bool = False,
                        study_uid: str | None = None, first_series: int = 1) -> list[Path]:
    """Write a synthetic chest CT study (one series per phase) as DICOM; with ``localizer``, add
    a 30-image series marked LOCALIZER (large enough that only its image type excludes it)."""
    import pydicom

    from models.phantom import generate_case
    from storage.volumes import StudyInfo, write_ct_series

    case = generate_case(seed, phases=phases, slices=slices, matrix=matrix)
    study = StudyInfo(study_uid or f"1.2.826.0.1.3680043.10.1452.{seed}", f"PH{seed}")
    paths: list[Path] = []
    for n, view in enumerate(case.views, start=first_series):
        paths += write_ct_series(folder / f"s{n}", view.pixels, view.z_mm, view.pixel_spacing_mm,
                                 view.plane, view.phase, study, n)
    if localizer:
        view = case.views[0]
        scout = write_ct_series(folder / "scout", view.pixels[:1].repeat(30, 0),
                                [float(k) for k in range(30)], view.pixel_spacing_mm, "axial",
                                view.phase, study, 99)
        for path in scout:
            ds = pydicom.dcmread(path)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.SeriesDescription = "Topogram"
            ds.save_as(path)
        paths += scout
    return paths
