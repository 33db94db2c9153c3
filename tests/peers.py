"""Real DICOM peers for the integration tests: Orthanc (a PACS with a REST API) and dcmtk's
storescp, both from Debian, with ``TCP_NODELAY=1`` (otherwise they wait ~45 ms per PDU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_port

ENV = {**os.environ, "TCP_NODELAY": "1"}


class StoreSCP:
    """``/usr/bin/storescp`` writing what it receives into ``out``; ``start`` may come later
    than construction (a destination that is down, then up)."""

    def __init__(self, work: Path, ae_title: str = "STORESCP") -> None:
        if not Path("/usr/bin/storescp").exists():
            pytest.skip("dcmtk missing (apt-get install dcmtk)")
        self.ae_title = ae_title
        self.port = free_port()
        self.out = work / f"storescp-{self.port}"
        self.out.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.log = self.out.with_suffix(".log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["/usr/bin/storescp", "-v", "-aet", self.ae_title,
                                          "-od", str(self.out), str(self.port)], env=ENV,
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def associations(self) -> int:
        """Associations accepted so far (from storescp's verbose log)."""
        return self.log.read_text(errors="replace").count("Association Acknowledged")

    def files(self) -> list[Path]:
        return sorted(self.out.iterdir())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


class Orthanc:
    """``/usr/sbin/Orthanc`` as a destination PACS, checked through its REST API."""

    def __init__(self, work: Path, ae_title: str = "ORTHANC") -> None:
        if shutil.which("Orthanc", path="/usr/sbin:/usr/bin") is None:
            pytest.skip("Orthanc missing (apt-get install orthanc)")
        self.ae_title = ae_title
        self.port, self.http = free_port(), free_port()
        work.mkdir(parents=True, exist_ok=True)
        cfg = work / "orthanc.json"
        cfg.write_text(json.dumps({
            "Name": "test-pacs", "StorageDirectory": str(work / "orthanc-db"),
            "IndexDirectory": str(work / "orthanc-db"), "DicomAet": ae_title,
            "DicomPort": self.port, "HttpPort": self.http, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "Plugins": []}))
        self.log = open(work / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", str(cfg)], env=ENV, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_port(self.port)
        wait_port(self.http)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=30) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def instances_of_modality(self, modality: str) -> list[str]:
        """Orthanc IDs of the stored instances whose series has ``modality``."""
        return [i for s in self.get("/series?expand")
                if s["MainDicomTags"].get("Modality") == modality for i in s["Instances"]]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def storescu(port: int, *paths: Path, called: str = "MSVLM", calling: str = "CT01") -> None:
    """Push files or folders with dcmtk's storescu (the real one, not pynetdicom's), each file in
    its own transfer syntax (``-R``: only the contexts the files need)."""
    result = subprocess.run(["/usr/bin/storescu", "-aet", calling, "-aec", called, "-R", "+sd",
                             "+r", "127.0.0.1", str(port), *map(str, paths)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def wait_for(predicate: Any, timeout_s: float = 90.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class PostgreSQL:
    """A throw-away PostgreSQL server from Debian's packages (``initdb`` + ``pg_ctl``), on a
    loopback port, trust authentication; run as the ``postgres`` user when we are root."""

    def __init__(self) -> None:
        import glob
        import tempfile

        pytest.importorskip("psycopg")
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            pytest.skip("PostgreSQL missing (apt-get install postgresql)")
        self.bin = Path(found[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="msvlm-pg-"))
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "msvlm", "--auth=trust")
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-w", "-l", str(self.dir / "log"),
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        self.url = f"postgresql+psycopg://msvlm@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([*self.prefix, str(self.bin / program), *args], check=True,
                       capture_output=True, timeout=120)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
