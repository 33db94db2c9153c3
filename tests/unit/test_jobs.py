"""Completion and job leases against a real SQLite index (times passed in, no sleeping)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.jobs import JobQueue, Outcome, utcnow
from storage.files import FileStore
from storage.index import Index, InstanceRecord, starts_report
from storage.schema import Job, JobState, Study, StudyState
from tests.conftest import write_phantom_study


@pytest.fixture
def setup(tmp_path: Path, make_config: Any) -> tuple[Index, JobQueue, list[Path]]:
    config = make_config(completion={"stable_age_s": 60}, worker={"max_attempts": 2})
    index = Index(config.storage.effective_database_url, FileStore(config.storage.root))
    files = write_phantom_study(tmp_path / "study", 40, slices=4, matrix=16)
    return index, JobQueue(index, config), files


def add(index: Index, files: list[Path]) -> None:
    index.add([InstanceRecord.from_file(f) for f in files])


def queued(index: Index, queue: JobQueue, files: list[Path]) -> datetime:
    """Index the study and queue its job as of a time past ``stable_age_s``; that time."""
    add(index, files)
    t = utcnow() + timedelta(seconds=61)
    assert len(queue.queue_stable(t)) == 1
    return t


def test_a_study_is_queued_once_when_stable(setup: Any) -> None:
    index, queue, files = setup
    add(index, files)
    now = utcnow()
    assert queue.queue_stable(now) == []  # just received
    [job_id] = queue.queue_stable(now + timedelta(seconds=61))
    assert queue.queue_stable(now + timedelta(seconds=120)) == []  # covered already
    with index.sessions() as session:
        study = session.query(Study).one()
        assert study.state == StudyState.STABLE
    # an image received later (its file time says when): a new job, once stable again
    later = time.time() + 3600
    os.utime(files[0], (later, later))
    add(index, files[:1])
    assert queue.queue_stable(now + timedelta(seconds=3600 + 30)) == []
    [second] = queue.queue_stable(now + timedelta(seconds=3600 + 61))
    assert second != job_id


def test_objects_that_never_start_a_report(setup: Any, tmp_path: Path) -> None:
    index, queue, files = setup
    ds = pydicom.dcmread(files[0])
    assert starts_report(str(ds.SOPClassUID), ds, index.device_uid)
    ours = pydicom.Dataset()
    ours.DeviceUID = index.device_uid
    ds.ContributingEquipmentSequence = [ours]
    assert not starts_report(str(ds.SOPClassUID), ds, index.device_uid)  # made by this node
    del ds.ContributingEquipmentSequence
    assert not starts_report("1.2.840.10008.5.1.4.1.1.88.33", ds, index.device_uid)  # SR
    assert not starts_report("1.2.840.10008.5.1.4.1.1.104.1", ds, index.device_uid)  # PDF
    # the device UID is created once and kept in the index
    again = Index(index.url, index.store)
    assert again.device_uid == index.device_uid


def test_processes_creating_an_identity_at_once_agree(setup: Any) -> None:
    """Two processes open a new index together (the node and a CLI command): one reads no
    identity, the other writes its own before the first inserts; the first keeps the winner's
    value instead of failing on the unique key (seen in CI as an IntegrityError)."""
    index, _, _ = setup
    other = Index(index.url, index.store)

    def create() -> str:
        return other.identity("site_key", lambda: "theirs") and "ours"

    assert index.identity("site_key", create) == "theirs"
    assert Index(index.url, index.store).identity("site_key", lambda: "new") == "theirs"


def test_leases_one_claim_and_take_over_after_expiry(setup: Any) -> None:
    index, queue, files = setup
    t = queued(index, queue, files)
    first = queue.claim("worker-a", t)
    assert first is not None and first.attempts == 1
    assert queue.claim("worker-b", t) is None  # leased
    assert queue.claim("worker-b", t + timedelta(seconds=61)).id == first.id  # expired
    assert not queue.renew(first.id, "worker-a")  # worker-a lost it
    outcome = Outcome("1.2.3", "data/x.dcm", None, "v", "1 axial", {"encode_s": 0.1}, ["pacs"])
    assert not queue.succeed(first.id, "worker-a", outcome)  # a stale result is dropped
    assert queue.succeed(first.id, "worker-b", outcome)
    [d] = queue.deliveries()
    assert (d.peer, d.sop_instance_uid) == ("pacs", "1.2.3")
    with index.sessions() as session:
        assert session.query(Study).one().state == StudyState.REPORTED


def test_transient_errors_retry_then_fail_with_the_reason(setup: Any) -> None:
    index, queue, files = setup
    t = queued(index, queue, files)
    job = queue.claim("w", t)
    queue.fail(job.id, "w", "OSError: disk hiccup", permanent=False)
    assert queue.claim("w") is None  # backing off (10 s after the first failure)
    job = queue.claim("w", utcnow() + timedelta(seconds=11))
    assert job is not None and job.attempts == 2
    queue.fail(job.id, "w", "OSError: disk hiccup", permanent=False)  # max_attempts = 2
    with index.sessions() as session:
        stored = session.get(Job, job.id)
        assert stored.state == JobState.FAILED and stored.error == "OSError: disk hiccup"
    # the operator fixed the cause: `msvlm-node requeue JOB`
    assert queue.requeue([job.id]) == 1 and queue.requeue([job.id]) == 0
    again = queue.claim("w")
    assert again is not None and again.id == job.id and again.attempts == 1


def test_a_worker_that_keeps_dying_fails_the_job(setup: Any) -> None:
    index, queue, files = setup
    t = queued(index, queue, files)
    queue.claim("w", t)
    queue.claim("w", t + timedelta(seconds=61))  # lease expired once: attempt 2
    assert queue.claim("w", t + timedelta(seconds=200)) is None
    [(job, _)] = queue.jobs()
    assert job.state == JobState.FAILED and "worker lost 2 times" in job.error


def test_concurrent_workers_claim_each_job_once(tmp_path: Path, make_config: Any) -> None:
    config = make_config(completion={"stable_age_s": 1})
    index = Index(config.storage.effective_database_url, FileStore(config.storage.root))
    for seed in range(6):
        add(index, write_phantom_study(tmp_path / f"st{seed}", 60 + seed, slices=2, matrix=16))
    t = utcnow() + timedelta(seconds=30)
    expected = sorted(JobQueue(index, config).queue_stable(t))
    assert len(expected) == 6
    claimed: list[tuple[str, int]] = []

    # one engine each, like separate worker processes (opened first: migrating is per process)
    queues = {f"w{n}": JobQueue(Index(index.url, index.store), config) for n in range(4)}

    def work(owner: str) -> None:
        own = queues[owner]
        while (job := own.claim(owner, t)) is not None:
            claimed.append((owner, job.id))
            time.sleep(0.01)
            own.succeed(job.id, owner, Outcome("1.2", "x", None, "v", "", {}, []))

    threads = [threading.Thread(target=work, args=(owner,)) for owner in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(job_id for _, job_id in claimed) == expected
    assert all(job.state == JobState.DONE for job, _ in JobQueue(index, config).jobs())


def test_a_process_killed_while_creating_the_index_leaves_one_that_opens(tmp_path: Path) -> None:
    """A node stopped (or killed) in its first seconds, while it creates the SQLite index:
    the half-made schema must not stay behind, or no later start could open the database
    ("table study already exists", seen when a worker was stopped during its first start)."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    killed = subprocess.run([sys.executable, "-c", f"""
import os
from sqlalchemy import event
import storage.index as index
engine = index.create_index_engine({url!r})
tables = []

@event.listens_for(engine, "after_cursor_execute")
def die_after_the_second_table(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith("CREATE TABLE"):
        tables.append(statement)
        if len(tables) == 2:
            os._exit(9)  # as a SIGKILL would: no rollback, no cleanup

index.migrate(engine)
"""], capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr  # it did die half-way
    opened = Index(url, FileStore(tmp_path / "store"))
    with opened.sessions() as session:
        assert session.query(Study).count() == 0  # the whole schema is there
    assert opened.device_uid
