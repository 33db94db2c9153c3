"""The worker in this process with the demo checkpoint: stored reasons for studies it cannot
report (no network involved)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.worker import Worker
from storage.schema import JobState
from tests.conftest import write_phantom_study

pytestmark = pytest.mark.integration


def edit(paths: list[Path], **values: Any) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            if keyword == "shift":
                x, y, z = (float(v) for v in ds.ImagePositionPatient)
                ds.ImagePositionPatient = [x + value * float(ds.InstanceNumber), y, z]
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


def test_stored_reasons_for_studies_that_cannot_be_reported(tmp_path: Path,
                                                            make_config: Any) -> None:
    config = make_config(model={"checkpoint": "demo", "device": "cpu", "threads": 1})
    worker = Worker(config)
    head = write_phantom_study(tmp_path / "head", 81, slices=20, matrix=32)
    edit(head, BodyPartExamined="HEAD")
    tilted = write_phantom_study(tmp_path / "tilted", 82, slices=20, matrix=32)
    edit(tilted, shift=0.8)  # each slice 0.8 mm further along the rows: gantry tilt
    few = write_phantom_study(tmp_path / "few", 83, slices=8, matrix=32)
    fine = write_phantom_study(tmp_path / "fine", 84, slices=20, matrix=32)
    received = time.time() - 120  # received two minutes ago: stable now
    for n, f in enumerate(head + tilted + few + fine):
        spooled = shutil.copy(f, worker.index.store.incoming / f"{n}.dcm")
        os.utime(spooled, (received, received))
    worker.index.drain(worker.index.store.pending())
    assert len(worker.queue.queue_stable()) == 4
    while worker.run_once():
        pass
    reasons = {uid.rsplit(".", 1)[1]: (job.state, job.error)
               for job, uid in worker.queue.jobs()}
    assert reasons["81"] == (JobState.FAILED, "not reported: no eligible series: body part "
                                              "HEAD not supported by this checkpoint")
    assert reasons["82"][0] == JobState.FAILED
    assert "unreadable volume" in reasons["82"][1] and "gantry tilt" in reasons["82"][1]
    assert reasons["83"] == (JobState.FAILED, "not reported: no eligible series: 8 images "
                                              "(< min_slices 16)")
    assert reasons["84"] == (JobState.DONE, None)
    worker.close()
