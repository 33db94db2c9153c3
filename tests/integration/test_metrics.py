"""Metrics, health, readiness and ``msvlm-node status`` of a real ``serve`` (issue 11, part 2):
dcmtk pushes a study from two receiving processes' shared port, an unknown AE title is
rejected, the draft is delivered to dcmtk's storescp, and a scrape over HTTP (parsed with
prometheus_client's own parser) counts exactly that."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.config import Config
from tests.conftest import ServeProcess, free_port, run_cli, write_phantom_study
from tests.integration.test_pipeline import sent_count
from tests.peers import ENV, StoreSCP, storescu, wait_for

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def test_scrape_status_and_readiness_of_a_running_node(
        tmp_path: Path, make_config: Callable[..., Config],
        serve: Callable[[Config], ServeProcess]) -> None:
    scp = StoreSCP(tmp_path).start()
    try:
        check_running_node(tmp_path, make_config, serve, scp)
    finally:
        scp.stop()


def check_running_node(tmp_path: Path, make_config: Callable[..., Config],
                       serve: Callable[[Config], ServeProcess], scp: StoreSCP) -> None:
    metrics_port = free_port()
    sections: dict[str, dict[str, Any]] = {
        "node": {"receive_processes": 2, "accept_unknown_peers": False},
        "peers__ct": {"ae_title": "CT01", "host": "127.0.0.1", "port": 104},
        "peers__pacs": {"ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port,
                        "allow_store": False},
        "completion": {"stable_age_s": 1.5},
        "worker": {"processes": 1, "stream": False},
        "model": {"checkpoint": "demo", "device": "cpu", "threads": 1},
        "report": {"send_to": ["pacs"]},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }
    config = make_config(**sections)
    proc = serve(config)
    files = write_phantom_study(tmp_path / "study", seed=11, slices=24)
    storescu(config.node.port, *files, calling="CT01")
    rejected = subprocess.run(["/usr/bin/storescu", "-aet", "STRANGER", "-aec", "MSVLM",
                               "127.0.0.1", str(config.node.port), str(files[0])],
                              env=ENV, capture_output=True, text=True, timeout=60)
    assert rejected.returncode != 0
    wait_for(lambda: sent_count(config) >= 1, 180, "the draft at storescp")

    assert get(metrics_port, "/healthz") == (200, "ok\n")
    code, text = get(metrics_port, "/metrics")
    assert code == 200
    scraped = samples(text)
    assert value(scraped, "msvlm_instances_received_total", calling_ae="CT01",
                 status="0x0000") == len(files)
    assert value(scraped, "msvlm_received_bytes_total", calling_ae="CT01") >= sum(
        f.stat().st_size for f in files) * 0.9
    assert value(scraped, "msvlm_associations_total", result="accepted", reason="") >= 1
    assert value(scraped, "msvlm_associations_total", result="rejected",
                 reason="unknown_calling_ae") == 1
    wait_for(lambda: value(samples(get(metrics_port, "/metrics")[1]),
                           "msvlm_delivery_attempts_total", peer="pacs", outcome="sent") >= 1,
             30, "the delivery counted")
    scraped = samples(get(metrics_port, "/metrics")[1])
    assert value(scraped, "msvlm_jobs", state="done") == 1
    assert value(scraped, "msvlm_jobs_finished_total", result="done") == 1
    assert value(scraped, "msvlm_deliveries", state="sent") >= 1
    for stage in ("collect", "load", "encode", "generate", "sr", "deliver"):
        assert value(scraped, "msvlm_job_stage_seconds_count", stage=stage) >= 1, stage
    assert value(scraped, "msvlm_instances_stored") == len(files) + 1  # and the draft SR
    assert value(scraped, "msvlm_spool_depth") == 0
    assert value(scraped, "msvlm_storage_free_bytes") > 0
    loaded = [k for k, v in scraped.items() if k[0] == "msvlm_model_info" and v == 1]
    assert len(loaded) == 1 and len(dict(loaded[0][1])["version"]) == 16
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(header.PatientName) not in text and str(header.PatientID) not in text

    status = run_cli("status", "-c", str(config.path))
    assert status.returncode == 0, status.stdout + status.stderr
    out = status.stdout
    assert "running (pid" in out and "Ready       yes" in out
    assert f"Received    {len(files)} instances" in out and "1 rejected" in out
    assert "done 1" in out and "Peer        ct: CT01" in out
    assert str(header.PatientName) not in out

    # /readyz: 503 with the failing check named once free space falls below the floor, 200
    # again when it returns (a real file takes the space; the floor is set just below what
    # is free now and applied by a reload)
    assert get(metrics_port, "/readyz")[0] == 200
    free = os.statvfs(config.storage.root).f_bavail * os.statvfs(config.storage.root).f_frsize
    text = config.path.read_text()
    config.path.write_text(text.replace("min_free_bytes = 0",
                                        f"min_free_bytes = {free - 200 * 2**20}"))
    proc.proc.send_signal(signal.SIGHUP)
    ballast = config.storage.root.parent / "ballast"
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 400 * 2**20)
    code, body = wait_for(lambda: (r := get(metrics_port, "/readyz"))[0] == 503 and r, 20,
                          "/readyz 503")
    assert "storage: FAIL" in body and "min_free_bytes" in body
    ballast.unlink()
    wait_for(lambda: get(metrics_port, "/readyz")[0] == 200, 20, "/readyz 200 again")

    proc.stop()
    after = run_cli("status", "-c", str(config.path))
    assert after.returncode == 3 and "NOT RUNNING" in after.stdout
