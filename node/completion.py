"""Completion: when a study is complete it gets a report job. Three cues, the first wins: quiet
for ``stable_age_s``; ``settle_s`` after the association that brought its newest images was
released with no other association holding it; ``settle_s`` after its newest image when every
series holds the images its headers announce (:meth:`node.jobs.JobQueue.complete_condition`).

Deadlines are derived from the index (receipt times, release records), never held only in
memory, so restarts and several receiving processes (or nodes) agree. APScheduler runs the scan
and the delivery retries in the serving process; neither touches the receive path.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from apscheduler.schedulers.background import BackgroundScheduler

from node.audit import AuditTrail
from node.config import Config
from node.jobs import JobQueue
from node.sender import Sender

logger = logging.getLogger(__name__)


def scan_interval_s(config: Config) -> float:
    """How often the completion scan runs: a quarter of ``stable_age_s`` (with a cue on, of
    ``settle_s`` if shorter), 0.25 s to 5 s."""
    cfg = config.completion
    wait = cfg.stable_age_s
    if cfg.association_cue or cfg.expected_count_cue:
        wait = min(wait, cfg.settle_s)
    return min(5.0, max(0.25, wait / 4))


def delivery_interval_s(config: Config) -> float:
    """How often the outbox is looked at: 0.1 s (one indexed query), so a new draft leaves at
    once (at 0.25 s the wait was ~0.13 s of the 1.5 s target from stable to SR; retries wait for
    their own ``next_try_at``); half the first retry delay when that is shorter."""
    return max(0.05, min(0.1, config.delivery.retry_delay_s / 2))


class Scheduler:
    """The periodic work of a serving node: completion scan and delivery.

    Parameters
    ----------
    queue : JobQueue
        The index's jobs and outbox.
    config : Config
        ``[completion]`` and ``[delivery]`` settings and the peers.
    before_scan : callable, optional
        Run before each completion scan (the node indexes what is spooled, so a study is never
        judged stable while one of its instances waits in ``incoming/``).
    on_queued : callable, optional
        Called when a scan queued jobs (the node wakes its workers).
    outbox_wake : multiprocessing.Event, optional
        Set by a worker that put objects in the outbox: the delivery runs at once.
    """

    def __init__(self, queue: JobQueue, config: Config,
                 before_scan: Callable[[], object] | None = None,
                 on_queued: Callable[[], object] | None = None,
                 outbox_wake: Any = None) -> None:
        self.queue = queue
        self.sender = Sender(queue, config)
        self.before_scan = before_scan
        self.on_queued = on_queued
        self.outbox_wake = outbox_wake
        self._stopping = threading.Event()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        options = dict(max_instances=1, coalesce=True, misfire_grace_time=None)
        self.scheduler.add_job(self.scan, "interval", seconds=scan_interval_s(config),
                               id="completion", **options)
        self.scheduler.add_job(self.deliver, "interval", seconds=delivery_interval_s(config),
                               id="delivery", **options)
        self.config = config
        self.scheduler.add_job(self.retain, "interval", hours=24, id="retention",
                               next_run_time=datetime.now(timezone.utc) + timedelta(minutes=1),
                               **options)

    def scan(self) -> list[int]:
        try:
            if self.before_scan is not None:
                self.before_scan()
            queued = self.queue.queue_stable()
            if queued and self.on_queued is not None:
                self.on_queued()
            return queued
        except Exception:  # noqa: BLE001 - the next scan tries again
            logger.exception("Completion scan failed")
            return []

    def deliver(self) -> int:
        try:
            return self.sender.run_once()
        except Exception:  # noqa: BLE001 - rows keep their state; the next run tries again
            logger.exception("Delivery run failed")
            return 0

    def retain(self) -> int:
        """The daily purge of studies older than ``[storage] retention_days`` (if set)."""
        from node.retention import purge

        days = self.config.storage.retention_days
        if not days:
            return 0
        try:
            return len(purge(self.queue.index, days).studies)
        except Exception:  # noqa: BLE001 - tomorrow tries again; purging is idempotent
            logger.exception("Retention purge failed")
            return 0

    def reload(self, config: Config) -> None:
        """New completion and delivery settings for the next scans and sends."""
        self.queue.config = config
        self.config = config
        self.sender.config = config
        self.sender.audit = AuditTrail.from_config(config)

    def _watch_outbox(self) -> None:
        """Run the delivery as soon as a worker says the outbox has something (the interval
        job stays for retries and for workers elsewhere)."""
        while not self._stopping.is_set():
            if self.outbox_wake.wait(1.0) and not self._stopping.is_set():
                self.outbox_wake.clear()
                try:
                    self.scheduler.modify_job("delivery", next_run_time=datetime.now(timezone.utc))
                except Exception:  # noqa: BLE001 - the interval run sends it a moment later
                    logger.debug("Delivery not brought forward", exc_info=True)

    def start(self) -> None:
        self.scheduler.start()
        if self.outbox_wake is not None:
            threading.Thread(target=self._watch_outbox, name="msvlm-outbox-wake",
                             daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        if self.outbox_wake is not None:
            self.outbox_wake.set()
        self.scheduler.shutdown(wait=True)
