"""Retention: ``msvlm-node purge`` removes exactly the studies that are old enough and settled,
files and rows, and a purge interrupted half-way is finished by the next one."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
from sqlalchemy import update

from node.config import Config
from node.jobs import JobQueue, Outcome, utcnow
from storage.files import FileStore
from storage.index import Index
from storage.schema import Delivery, DeliveryState, Study
from tests.conftest import run_cli, write_phantom_study

pytestmark = pytest.mark.integration


def add_study(index: Index, tmp_path: Path, seed: int, age_days: float) -> str:
    files = write_phantom_study(tmp_path / f"s{seed}", seed, slices=4, matrix=16)
    spooled = []
    for f in files:  # as received: through the spool into data/
        target = index.store.incoming / f"{seed}-{f.name}"
        target.write_bytes(f.read_bytes())
        spooled.append(target)
    index.drain(spooled)
    uid = f"1.2.826.0.1.3680043.10.1452.{seed}"
    with index.sessions.begin() as session:
        session.execute(update(Study).where(Study.study_instance_uid == uid).values(
            last_received_at=utcnow() - timedelta(days=age_days)))
    return uid


def settle(queue: JobQueue, uid: str, job_state: str, delivery: str | None) -> None:
    """Give the study a job in ``job_state`` and (for done jobs) a delivery in that state."""
    t = utcnow() + timedelta(days=1)
    [job_id] = [j for j in queue.queue_stable(t)]
    if job_state == "queued":
        return
    job = queue.claim("w", t)
    assert job is not None and job.id == job_id
    outcome = Outcome("1.2.3." + uid.rsplit(".", 1)[1], f"data/{uid}/sr.dcm", None, "v", "1",
                      {}, ["pacs"] if delivery else [])
    assert queue.succeed(job.id, "w", outcome)
    (queue.index.store.root / "data" / uid / "sr.dcm").write_bytes(b"draft")
    if delivery:
        with queue.index.sessions.begin() as session:
            session.execute(update(Delivery).where(Delivery.job_id == job.id).values(
                state=DeliveryState(delivery)))


def test_purge_removes_old_settled_studies_only(tmp_path: Path,
                                                make_config: Callable[..., Config]) -> None:
    config = make_config(storage={"retention_days": 30},
                         peers__pacs={"ae_title": "PACS", "host": "127.0.0.1", "port": 104})
    index = Index(config.storage.effective_database_url, FileStore(config.storage.root))
    queue = JobQueue(index, config)
    plan: dict[int, tuple[float, str, str | None, bool]] = {
        # seed: (age in days, job state, delivery state, purged?)
        71: (40, "done", "sent", True),
        72: (40, "done", "dead", True),
        74: (40, "done", "pending", False),  # an undelivered draft
        75: (5, "done", "sent", False),  # too young
        76: (40, "done", "sent", True),  # interrupted below, finished by the next purge
        73: (40, "queued", None, False),  # an open job (last: the others' jobs are claimed)
    }
    uids = {}
    for seed, (age, job_state, delivery, _) in plan.items():
        uids[seed] = add_study(index, tmp_path, seed, age)
        settle(queue, uids[seed], job_state, delivery)
    dry = run_cli("purge", "--dry-run", "-c", str(config.path))
    assert dry.returncode == 0, dry.stderr
    listed = {line for line in dry.stdout.splitlines() if line.startswith("1.2.")}
    assert listed == {uids[s] for s, p in plan.items() if p[3]}
    assert "Would purge 3 studies older than 30 days" in dry.stdout
    assert all((config.storage.root / "data" / uid).exists() for uid in uids.values())

    # a purge that died after removing study 76's files, before its rows
    for path in (config.storage.root / "data" / uids[76]).rglob("*"):
        if path.is_file():
            path.unlink()
    done = run_cli("purge", "-c", str(config.path))
    assert done.returncode == 0, done.stderr
    assert "Purged 3 studies older than 30 days" in done.stdout
    for seed, (_, _, _, purged) in plan.items():
        assert (config.storage.root / "data" / uids[seed]).exists() != purged, seed
    studies = run_cli("studies", "-c", str(config.path)).stdout
    assert {uid for uid in uids.values() if uid in studies} == {
        uids[s] for s, p in plan.items() if not p[3]}
    rebuilt = run_cli("reindex", "-c", str(config.path))  # index and disk agree
    assert "removed 0 row(s)" in rebuilt.stdout, rebuilt.stdout
    again = run_cli("purge", "-c", str(config.path))
    assert "Purged 0 studies" in again.stdout
    index.close()


def test_purge_needs_a_retention(make_config: Callable[..., Config]) -> None:
    config = make_config()
    result = run_cli("purge", "-c", str(config.path))
    assert result.returncode == 2 and "retention_days is 0" in result.stdout


