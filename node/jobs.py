"""The report jobs and the outbox in the index: queueing, leases, outcomes, listings.

Every decision is a conditional UPDATE checked by its row count, so several receiving processes,
several workers and (on PostgreSQL) several nodes sharing one index never queue, claim or send
the same thing twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from node.config import Config
from storage.index import Index
from storage.schema import Delivery, DeliveryState, Job, JobState, Series, Study, StudyState

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Naive UTC, as the index stores times."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def default_owner() -> str:
    """Lease owner name: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Outcome:
    """A finished job: the stored objects and the destinations they go to."""

    sr_sop_instance_uid: str
    sr_path: str
    pdf: tuple[str, str] | None  # (SOP Instance UID, path) of the Encapsulated PDF
    model_version: str
    series_read: str
    timings: dict[str, float]
    peers: Sequence[str]
    kos: tuple[str, str] | None = None  # (SOP Instance UID, path) of the key-image selection


class JobQueue:
    """Report jobs and deliveries of one index under one configuration."""

    def __init__(self, index: Index, config: Config) -> None:
        self.index = index
        self.config = config

    def _lock(self, query: Any, session: Session) -> Any:
        # Row locks that skip rows another node holds (PostgreSQL); SQLite serialises writers.
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            return query.with_for_update(skip_locked=True)
        return query

    # -- completion ---------------------------------------------------------------------------
    NOT_IMAGES = ("SR", "KO", "PR", "DOC", "REG", "SEG")

    def complete_condition(self, now: datetime) -> Any:
        """SQL condition of a complete study: quiet for ``stable_age_s``, or (association cue)
        released ``settle_s`` ago after its newest image with no association holding it, or
        (expected-count cue) ``settle_s`` after its newest image every series holds the images
        its headers announce."""
        cfg = self.config.completion
        settled = now - timedelta(seconds=cfg.settle_s)
        cues = [Study.last_image_at <= now - timedelta(seconds=cfg.stable_age_s)]
        if cfg.association_cue:
            cues.append(and_(Study.released_at.is_not(None),
                             Study.released_at >= Study.last_image_at,
                             Study.released_at <= settled))
        if cfg.expected_count_cue:
            short = select(Series.id).where(
                Series.study_id == Study.id, Series.modality.not_in(self.NOT_IMAGES),
                or_(Series.expected_images.is_(None),
                    Series.instance_count < Series.expected_images)).exists()
            announced = select(Series.id).where(Series.study_id == Study.id,
                                                Series.expected_images.is_not(None)).exists()
            cues.append(and_(Study.last_image_at <= settled, announced, ~short))
        return or_(*cues)

    def queue_stable(self, now: datetime | None = None) -> list[int]:
        """Queue one job for every complete study (:meth:`complete_condition`) whose newest
        images no job covers yet; return the new job ids."""
        now = now or utcnow()
        uncovered = or_(Study.queued_through.is_(None), Study.queued_through < Study.last_image_at)
        created = []
        with self.index.sessions.begin() as session:
            rows = session.execute(select(Study.id, Study.last_image_at).where(
                Study.last_image_at.is_not(None), self.complete_condition(now),
                uncovered)).all()
            for study_id, last_image in rows:
                claimed = session.execute(
                    update(Study).where(Study.id == study_id, Study.last_image_at == last_image,
                                        uncovered)
                    .values(queued_through=last_image, state=StudyState.STABLE))
                if claimed.rowcount != 1:  # type: ignore[attr-defined]
                    continue  # another node queued it, or an image just arrived
                job = Job(study_id=study_id, state=JobState.QUEUED, created_at=now,
                          covers_through=last_image, attempts=0, not_before=now)
                session.add(job)
                session.flush()
                created.append(job.id)
        for job_id in created:
            logger.info("Study stable: queued report job %d", job_id)
        return created

    # -- the worker's side --------------------------------------------------------------------
    def claim(self, owner: str, now: datetime | None = None) -> Job | None:
        """Lease the oldest runnable job (queued and due, or running with an expired lease)."""
        now = now or utcnow()
        cfg = self.config.worker
        runnable = or_(and_(Job.state == JobState.QUEUED, Job.not_before <= now),
                       and_(Job.state == JobState.RUNNING, Job.lease_until < now))
        with self.index.sessions.begin() as session:
            query = self._lock(select(Job).where(runnable).order_by(Job.id).limit(8), session)
            for job in session.scalars(query).all():
                if job.state == JobState.RUNNING and job.attempts >= cfg.max_attempts:
                    job.state, job.finished_at = JobState.FAILED, now
                    job.error = f"worker lost {job.attempts} times (crash or out of memory)"
                    logger.error("Job %d failed: %s", job.id, job.error)
                    continue
                got = session.execute(update(Job).where(Job.id == job.id, runnable).values(
                    state=JobState.RUNNING, lease_owner=owner, attempts=Job.attempts + 1,
                    lease_until=now + timedelta(seconds=cfg.lease_s), started_at=now))
                if got.rowcount == 1:  # type: ignore[attr-defined]
                    session.refresh(job)
                    return job
        return None

    def renew(self, job_id: int, owner: str) -> bool:
        """Extend a held lease; ``False`` when the lease was lost."""
        until = utcnow() + timedelta(seconds=self.config.worker.lease_s)
        with self.index.sessions.begin() as session:
            got = session.execute(update(Job).where(
                Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
                .values(lease_until=until))
            return bool(got.rowcount == 1)  # type: ignore[attr-defined]

    def succeed(self, job_id: int, owner: str, outcome: Outcome) -> bool:
        """Record the draft and queue one delivery per object and destination."""
        now = utcnow()
        with self.index.sessions.begin() as session:
            got = session.execute(update(Job).where(
                Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
                .values(state=JobState.DONE, finished_at=now, error=None,
                        sr_sop_instance_uid=outcome.sr_sop_instance_uid, sr_path=outcome.sr_path,
                        pdf_path=outcome.pdf[1] if outcome.pdf else None,
                        model_version=outcome.model_version,
                        series_read=outcome.series_read[:1024],
                        timings=json.dumps({k: round(v, 3) for k, v in outcome.timings.items()})))
            if got.rowcount != 1:  # type: ignore[attr-defined]
                logger.warning("Job %d: lease lost before it finished; result dropped", job_id)
                return False
            objects = [(outcome.sr_sop_instance_uid, outcome.sr_path)]
            objects += [extra for extra in (outcome.pdf, outcome.kos) if extra]
            for peer in outcome.peers:
                for sop_uid, path in objects:
                    session.add(Delivery(job_id=job_id, peer=peer, sop_instance_uid=sop_uid,
                                         path=path, state=DeliveryState.PENDING, attempts=0,
                                         next_try_at=now))
            job = session.get(Job, job_id)
            assert job is not None
            session.execute(update(Study).where(
                Study.id == job.study_id, Study.queued_through == job.covers_through,
                Study.state == StudyState.STABLE).values(state=StudyState.REPORTED))
        return True

    def fail(self, job_id: int, owner: str, error: str, permanent: bool) -> None:
        """Store why a job failed: for good, or queued again after a backoff."""
        now = utcnow()
        with self.index.sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None or job.lease_owner != owner or job.state != JobState.RUNNING:
                return
            job.error = error[:1024]
            if permanent or job.attempts >= self.config.worker.max_attempts:
                job.state, job.finished_at = JobState.FAILED, now
                logger.error("Job %d failed: %s", job_id, error)
            else:
                job.state = JobState.QUEUED
                job.not_before = now + timedelta(seconds=10 * 2 ** (job.attempts - 1))
                logger.warning("Job %d failed (attempt %d), retrying: %s", job_id, job.attempts,
                               error)

    # -- listings and the operator's commands -------------------------------------------------
    def jobs(self, limit: int = 100) -> list[tuple[Job, str]]:
        """Newest jobs first, with their study's UID."""
        with self.index.sessions() as session:
            rows = session.execute(select(Job, Study.study_instance_uid).join(Study)
                                   .order_by(Job.id.desc()).limit(limit)).all()
            return [(job, uid) for job, uid in rows]

    def deliveries(self, limit: int = 100, state: DeliveryState | None = None) -> list[Delivery]:
        with self.index.sessions() as session:
            query = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
            if state is not None:
                query = query.where(Delivery.state == state)
            return list(session.scalars(query).all())

    def requeue(self, job_ids: Sequence[int]) -> int:
        """Run failed jobs again (after a fix of the configuration or the data); how many."""
        now = utcnow()
        with self.index.sessions.begin() as session:
            got = session.execute(update(Job).where(Job.id.in_(job_ids),
                                                    Job.state == JobState.FAILED).values(
                state=JobState.QUEUED, attempts=0, not_before=now, error=None,
                lease_owner=None, lease_until=None, finished_at=None))
            return int(got.rowcount)  # type: ignore[attr-defined]

    def resend(self, delivery_ids: Sequence[int] = (), job_ids: Sequence[int] = (),
               dead: bool = False) -> int:
        """Queue deliveries again now (attempts reset); return how many."""
        conditions: list[Any] = []
        if delivery_ids:
            conditions.append(Delivery.id.in_(delivery_ids))
        if job_ids:
            conditions.append(Delivery.job_id.in_(job_ids))
        if dead:
            conditions.append(Delivery.state == DeliveryState.DEAD)
        if not conditions:
            return 0
        with self.index.sessions.begin() as session:
            got = session.execute(update(Delivery).where(or_(*conditions)).values(
                state=DeliveryState.PENDING, attempts=0, next_try_at=utcnow(), last_error=None))
            return int(got.rowcount)  # type: ignore[attr-defined]
