"""Streaming: idle workers encode the slices of a study while it still arrives; at completion
only the rest is read. Real ``serve`` with the demo checkpoint, real associations."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pydicom
import pytest
from sqlalchemy import func, select

from node.config import Config
from node.sr import sr_text
from storage.files import FileStore
from storage.index import Index
from storage.schema import JobState, SliceEmbedding
from tests.conftest import ServeProcess, run_cli, write_phantom_study
from tests.integration.test_completion import open_association, store_all
from tests.integration.test_pipeline import finished, jobs_of
from tests.peers import storescu, wait_for

pytestmark = pytest.mark.integration


def stream_config(make_config: Callable[..., Config], **completion: Any) -> Config:
    return make_config(worker={"processes": 1, "stream": True},
                       model={"checkpoint": "demo", "device": "cpu", "threads": 1},
                       completion={"stable_age_s": 600, "settle_s": 1, **completion})


def embeddings(config: Config) -> int:
    index = Index(config.storage.effective_database_url, FileStore(config.storage.root))
    try:
        with index.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(SliceEmbedding)) or 0)
    finally:
        index.close()


def test_slices_encoded_while_arriving_give_the_same_draft(
        tmp_path: Path, make_config: Callable[..., Config],
        serve: Callable[[Config], ServeProcess]) -> None:
    config = stream_config(make_config)
    serve(config)
    uid = "1.2.826.0.1.3680043.10.1452.61"
    study = tmp_path / "study"
    files = write_phantom_study(study, 61, phases=("non_contrast", "arterial"), slices=24,
                                matrix=48)
    first = [f for f in files if f.parent.name == "s1"]
    holder = open_association(config.node.port)  # series 1 now, the association stays open
    store_all(holder, first)
    wait_for(lambda: embeddings(config) >= len(first), timeout_s=60,
             what="series 1 encoded while the study is still arriving")
    assert jobs_of(config, uid) == []  # not complete yet: encoded before completion
    storescu(config.node.port, *[f for f in files if f.parent.name == "s2"])  # seconds later
    holder.release()
    [job] = wait_for(lambda: finished(config, uid), timeout_s=120, what="the report job")
    assert job.state == JobState.DONE, job.error
    timings = json.loads(job.timings)
    assert timings["streamed_slices"] >= len(first)  # those were not read or encoded again
    sr = pydicom.dcmread(config.storage.root / job.sr_path)
    findings, impression = sr_text(sr)
    # the same files reported without streaming (offline: read whole, encoded at once)
    offline = run_cli("report", str(study), "--out", str(tmp_path / "offline"))
    assert offline.returncode == 0, offline.stderr
    assert f"Findings: {findings}\nImpression: {impression}" in offline.stdout


def test_killed_mid_stream_and_restarted_reports_once(
        tmp_path: Path, make_config: Callable[..., Config],
        serve: Callable[[Config], ServeProcess]) -> None:
    config = stream_config(make_config, stable_age_s=20)
    node = serve(config)
    uid = "1.2.826.0.1.3680043.10.1452.62"
    files = write_phantom_study(tmp_path / "study", 62, slices=40, matrix=48)
    holder = open_association(config.node.port)
    store_all(holder, files)
    wait_for(lambda: embeddings(config) > 0, timeout_s=60, what="streaming to start")
    node.kill()  # mid-stream; the open association dies with it (no release: no cue)
    kept = embeddings(config)
    serve(config)  # the quiet period completes the study after the restart
    [job] = wait_for(lambda: finished(config, uid), timeout_s=120, what="the report job")
    assert job.state == JobState.DONE, job.error
    assert json.loads(job.timings)["streamed_slices"] >= kept > 0  # kept across the restart
    time.sleep(3)  # more completion scans: still exactly one job and one SR
    assert len(jobs_of(config, uid)) == 1
    srs = list((config.storage.root / "data" / uid).rglob("*.dcm"))
    assert sum(pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR" for p in srs) == 1
