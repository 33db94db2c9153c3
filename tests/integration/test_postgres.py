"""One index on PostgreSQL shared by several workers: the serving node's two worker processes
and a worker started on its own (as a GPU machine would join). Every study is reported and
delivered exactly once."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest

from storage.schema import DeliveryState, JobState
from tests.conftest import MSVLM_NODE, write_phantom_study
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
