"""One index on PostgreSQL shared by several workers (the serving node's two worker processes
and a worker started on its own, as a GPU machine would join) and by several receiving nodes.
Every study is reported and delivered exactly once."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.config import load_config
from storage.schema import DeliveryState, JobState
from tests.conftest import MSVLM_NODE, free_port, write_phantom_study
from tests.integration.test_pipeline import pipeline_config, queue, sent_count
from tests.peers import PostgreSQL, StoreSCP, storescu, wait_for

pytestmark = pytest.mark.integration


def test_several_workers_share_one_postgresql_index(tmp_path: Path, make_config: Any,
                                                    serve: Any) -> None:
    pg = PostgreSQL()
    scp = StoreSCP(tmp_path).start()
    worker = None
    try:
        config = pipeline_config(make_config, scp, storage={"database_url": pg.url},
                                 worker={"processes": 2})
        serve(config)
        worker = subprocess.Popen([MSVLM_NODE, "worker", "-c", str(config.path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        studies = [f"1.2.826.0.1.3680043.10.1452.{seed}" for seed in (71, 72, 73, 74)]
        for seed in (71, 72, 73, 74):
            write_phantom_study(tmp_path / f"st{seed}", seed, slices=20, matrix=32)
        storescu(config.node.port, *(tmp_path / f"st{seed}" for seed in (71, 72, 73, 74)))
        jobs = wait_for(lambda: [j for j, _ in queue(config).jobs()
                                 if j.state in (JobState.DONE, JobState.FAILED)][3:] and
                        queue(config).jobs(), what="4 finished jobs")
        assert sorted(uid for _, uid in jobs) == studies  # one job per study
        assert {job.state for job, _ in jobs} == {JobState.DONE}
        wait_for(lambda: len(scp.files()) == 4, what="4 SRs at storescp")
        assert Counter(str(pydicom.dcmread(f).StudyInstanceUID) for f in scp.files()) == \
            Counter(studies)
        wait_for(lambda: sent_count(config) >= 4,
                 what="4 deliveries recorded as sent")  # peers store before the node records
        assert {d.state for d in queue(config).deliveries()} == {DeliveryState.SENT}
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        scp.stop()
        pg.stop()


def test_two_receiving_nodes_share_one_index_and_storage_root(tmp_path: Path, make_config: Any,
                                                              serve: Any) -> None:
    """Two ``serve`` processes (two hosts behind one DNS name) on one PostgreSQL index and one
    storage root, each spooling into its own ``incoming/<node_id>/``: a study whose two series
    arrive one at each node at the same time is one study with every instance, one job, one SR."""
    pg = PostgreSQL()
    scp = StoreSCP(tmp_path).start()
    try:
        shared = {"storage": {"database_url": pg.url},
                  "completion": {"stable_age_s": 30, "settle_s": 5},
                  "worker": {"processes": 1, "stream": False}}
        first = pipeline_config(make_config, scp, node={"node_id": "node-a"}, **shared)
        folder = tmp_path / "b"
        folder.mkdir()
        text = first.path.read_text().replace('node_id = "node-a"', 'node_id = "node-b"')
        text = text.replace(f"port = {first.node.port}\n", f"port = {free_port()}\n", 1)
        second = load_config(write_text(folder / "config.toml", text))
        assert second.node.node_id == "node-b" and second.node.port != first.node.port
        serve(first)
        serve(second)
        files = write_phantom_study(tmp_path / "split", 81, phases=("non_contrast", "arterial"),
                                    slices=20, matrix=32)
        halves = [[f for f in files if f.parent.name == name] for name in ("s1", "s2")]
        pushes = [threading.Thread(target=storescu, args=(config.node.port, *half))
                  for config, half in zip((first, second), halves)]
        for push in pushes:
            push.start()
        for push in pushes:
            push.join()
        study = "1.2.826.0.1.3680043.10.1452.81"
        wait_for(lambda: len(scp.files()) >= 1, 180, "the SR at storescp")
        wait_for(lambda: sent_count(first) >= 1, 30, "the delivery recorded")
        time.sleep(6)  # past settle_s: a second job would have been queued by now
        jobs = queue(first).jobs()
        assert [uid for _, uid in jobs] == [study] and jobs[0][0].state == JobState.DONE
        assert len(scp.files()) == 1
        listing = subprocess.run([MSVLM_NODE, "studies", "-c", str(second.path)],
                                 capture_output=True, text=True, timeout=60).stdout
        assert study in listing and f" {len(files) + 1} " in listing  # and the draft SR
        root = first.storage.root
        assert {p.name for p in (root / "incoming").iterdir()} == {"node-a", "node-b"}
        assert not any((root / "incoming" / "node-a").iterdir())
        assert not any((root / "incoming" / "node-b").iterdir())
    finally:
        scp.stop()
        pg.stop()


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
