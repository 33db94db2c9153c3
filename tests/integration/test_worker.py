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
            elif value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


def as_two_multiframe_objects(paths: list[Path], out: Path) -> list[Path]:
    """The series as two enhanced (legacy converted) CT objects in one new series, as Siemens
    XA and Philips enhanced scanners send stacks."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    out.mkdir()
    series_uid = generate_uid()
    half = len(paths) // 2
    objects = []
    for n, part in enumerate((paths[:half], paths[half:]), start=1):
        image = hd.legacy.LegacyConvertedEnhancedCTImage(
            [pydicom.dcmread(p) for p in part], series_instance_uid=series_uid, series_number=5,
            sop_instance_uid=generate_uid(), instance_number=n)
        image.BodyPartExamined = "CHEST"
        image.save_as(out / f"mf{n}.dcm")
        objects.append(out / f"mf{n}.dcm")
    return objects


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
    no_spacing = write_phantom_study(tmp_path / "nospacing", 85, slices=20, matrix=32)
    edit(no_spacing, PixelSpacing=None)
    multiframe = as_two_multiframe_objects(
        write_phantom_study(tmp_path / "mf", 86, slices=20, matrix=32), tmp_path / "mf-objects")
    received = time.time() - 120  # received two minutes ago: stable now
    for n, f in enumerate(head + tilted + few + fine + no_spacing + multiframe):
        spooled = shutil.copy(f, worker.index.store.incoming / f"{n}.dcm")
        os.utime(spooled, (received, received))
    worker.index.drain(worker.index.store.pending())
    assert len(worker.queue.queue_stable()) == 6
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
    assert reasons["85"] == (JobState.FAILED, "not reported: series 1: unreadable volume (a "
                                              "required DICOM attribute is missing or invalid: "
                                              "Pixel Spacing)")
    assert reasons["86"] == (JobState.DONE, None)  # two multi-frame objects: two views
    [(done, _)] = [(job, uid) for job, uid in worker.queue.jobs() if uid.endswith(".86")]
    assert done.series_read == "5 axial non_contrast (20)"
    for _, error in reasons.values():  # never a Python exception text
        assert not any(word in (error or "") for word in ("Error:", "Tag (", "attribute '"))
    worker.close()


def test_a_queued_job_starts_at_once_and_its_outbox_is_announced(tmp_path: Path,
                                                                 make_config: Any) -> None:
    """The serving process wakes an idle worker when the completion scan queues a job (the
    worker's own poll is a minute here), and the worker announces the draft in the outbox."""
    import multiprocessing
    import threading

    from node.completion import Scheduler

    config = make_config(model={"checkpoint": "demo", "device": "cpu", "threads": 1},
                         peers__pacs={"ae_title": "PACS", "host": "127.0.0.1", "port": 1},
                         report={"send_to": ["pacs"]})
    wake, delivered = multiprocessing.Event(), multiprocessing.Event()
    worker = Worker(config, poll_s=60.0, wake=wake, delivered=delivered)
    scheduler = Scheduler(worker.queue, config, on_queued=wake.set)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        received = time.time() - 120
        for n, f in enumerate(write_phantom_study(tmp_path / "s", 91, slices=20, matrix=32)):
            spooled = shutil.copy(f, worker.index.store.incoming / f"{n}.dcm")
            os.utime(spooled, (received, received))
        worker.index.drain(worker.index.store.pending())
        time.sleep(2.0)  # past the worker's warm-up: it now waits in its 60 s poll
        assert not wake.is_set()
        queued_at = time.monotonic()
        assert len(scheduler.scan()) == 1
        assert delivered.wait(30.0), "the worker never announced its draft"
        assert time.monotonic() - queued_at < 30.0
        [(job, _)] = worker.queue.jobs()
        assert job.state == JobState.DONE
        assert [d.peer for d in worker.queue.deliveries()] == ["pacs"]
    finally:
        stop.set()
        wake.set()
        thread.join(timeout=60)
        worker.close()
