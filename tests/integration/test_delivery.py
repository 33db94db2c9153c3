"""The outbox against a real storescp: backoff, dead letters, ``resend``, one association per
batch (no model involved)."""

from __future__ import annotations

import io
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.jobs import JobQueue, Outcome, utcnow
from node.sender import Sender
from node.sr import SeriesRead, build_report_sr
from storage.files import FileStore
from storage.index import Index, InstanceRecord
from storage.schema import DeliveryState
from tests.conftest import run_cli, write_phantom_study
from tests.peers import StoreSCP

pytestmark = pytest.mark.integration


def test_dead_letters_resend_and_one_association_per_batch(tmp_path: Path,
                                                           make_config: Any) -> None:
    scp = StoreSCP(tmp_path)  # down for now
    config = make_config(peers__pacs={"ae_title": scp.ae_title, "host": "127.0.0.1",
                                      "port": scp.port},
                         delivery={"retry_delay_s": 0.2, "max_retry_delay_s": 0.2,
                                   "max_retries": 1})
    index = Index(config.storage.effective_database_url, FileStore(config.storage.root))
    files = write_phantom_study(tmp_path / "study", 50, slices=4, matrix=16)
    index.add([InstanceRecord.from_file(f) for f in files])
    queue = JobQueue(index, config)
    t = utcnow() + timedelta(seconds=120)
    queue.queue_stable(t)
    job = queue.claim("w", t)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    objects = []
    for _ in range(3):  # three objects for one peer: one association
        sr = build_report_sr("A.", "B.", "m", "0" * 16, index.device_uid, [header],
                             [SeriesRead(header.SeriesInstanceUID, 1, "", "axial", "unknown", 4)])
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        path = index.store.write_final(sr.StudyInstanceUID, sr.SeriesInstanceUID,
                                       sr.SOPInstanceUID, buffer.getvalue())
        objects.append((str(sr.SOPInstanceUID), str(path.relative_to(index.store.root))))
    outcome = Outcome(objects[0][0], objects[0][1], None, "v", "1", {}, ["pacs"])
    assert queue.succeed(job.id, "w", outcome)
    with index.sessions.begin() as session:  # two more objects of the same job
        from storage.schema import Delivery

        for uid, path in objects[1:]:
            session.add(Delivery(job_id=job.id, peer="pacs", sop_instance_uid=uid, path=path,
                                 state=DeliveryState.PENDING, attempts=0, next_try_at=utcnow()))
    sender = Sender(queue, config)
    assert sender.run_once() == 0  # down: attempt 1, backing off
    assert {d.state for d in queue.deliveries()} == {DeliveryState.PENDING}
    assert sender.run_once() == 0  # not due yet: no attempt
    assert {d.attempts for d in queue.deliveries()} == {1}
    time.sleep(0.3)
    assert sender.run_once() == 0  # attempt 2 > max_retries 1: dead letters
    dead = queue.deliveries(state=DeliveryState.DEAD)
    assert len(dead) == 3 and all("association" in (d.last_error or "") for d in dead)
    listing = run_cli("deliveries", "--state", "dead", "-c", str(config.path))
    assert listing.stdout.count(" dead ") == 3, listing.stdout

    scp.start()
    try:
        resent = run_cli("resend", "--dead", "-c", str(config.path))
        assert resent.returncode == 0 and "Queued 3 deliveries" in resent.stdout
        assert sender.run_once() == 3
        assert {d.state for d in queue.deliveries()} == {DeliveryState.SENT}
        assert sorted(pydicom.dcmread(f).SOPInstanceUID for f in scp.files()) == sorted(
            uid for uid, _ in objects)
        assert scp.associations() == 1
        assert sender.run_once() == 0  # sent once, never again
        assert len(scp.files()) == 3
    finally:
        scp.stop()
    # the audit trail: every attempt of every object, in order (retry, dead, then after the
    # resend, which starts counting again, sent)
    lines = [json.loads(line) for line in
             (config.storage.root / "audit.jsonl").read_text().splitlines()]
    for uid, _ in objects:
        mine = [(d["attempt"], d["outcome"]) for d in lines
                if d["event"] == "delivery" and d["sop_instance_uid"] == uid]
        assert mine == [(1, "retry"), (2, "dead"), (1, "sent")], mine
    sent = [d for d in lines if d.get("outcome") == "sent"]
    assert {(d["peer"], d["called"], d["address"]) for d in sent} == {
        ("pacs", scp.ae_title, f"127.0.0.1:{scp.port}")}
