"""Delivery of drafts: the outbox rows of the index sent by C-STORE, one association per peer
and batch, with persisted attempts, exponential backoff and dead letters."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import timedelta

from sqlalchemy import select, update

from node import metrics
from node.audit import AuditTrail
from node.config import Config
from node.jobs import JobQueue, utcnow
from node.scu import Target, send
from storage.schema import Delivery, DeliveryState

logger = logging.getLogger(__name__)

CLAIM_S = 120.0
"""How long a batch being sent is hidden from other senders (a crash mid-send retries after)."""


class Sender:
    """Sends due deliveries (``run_once`` is what the scheduler calls).

    Parameters
    ----------
    queue : JobQueue
        The index's jobs and outbox.
    config : Config
        Peers and ``[delivery]`` settings.
    batch : int
        Most objects per association.
    """

    def __init__(self, queue: JobQueue, config: Config, batch: int = 64) -> None:
        self.queue = queue
        self.config = config
        self.batch = batch
        self.audit = AuditTrail.from_config(config)

    def backoff_s(self, attempts: int) -> float:
        """Delay before the next try after ``attempts`` failed ones."""
        cfg = self.config.delivery
        return float(min(cfg.retry_delay_s * 2 ** max(attempts - 1, 0), cfg.max_retry_delay_s))

    def _claim(self) -> dict[str, list[tuple[int, str]]]:
        now = utcnow()
        due = (Delivery.state == DeliveryState.PENDING) & (Delivery.next_try_at <= now)
        claimed: dict[str, list[tuple[int, str]]] = defaultdict(list)
        with self.queue.index.sessions.begin() as session:
            rows = session.execute(select(Delivery.id, Delivery.peer, Delivery.path).where(due)
                                   .order_by(Delivery.id).limit(self.batch * 8)).all()
            for delivery_id, peer, path in rows:
                if len(claimed[peer]) >= self.batch:
                    continue
                got = session.execute(update(Delivery).where(Delivery.id == delivery_id, due)
                                      .values(next_try_at=now + timedelta(seconds=CLAIM_S)))
                if got.rowcount == 1:  # type: ignore[attr-defined]
                    claimed[peer].append((delivery_id, path))
        return claimed

    def _record(self, results: dict[int, str | None]) -> None:
        """Store each delivery's outcome (``None`` = sent, else the error)."""
        now = utcnow()
        with self.queue.index.sessions.begin() as session:
            for delivery in session.scalars(select(Delivery).where(
                    Delivery.id.in_(list(results)))):
                error = results[delivery.id]
                delivery.attempts += 1
                self._audit(delivery, error)
                if error is None:
                    delivery.state, delivery.sent_at, delivery.last_error = \
                        DeliveryState.SENT, now, None
                    logger.info("Delivery %d sent to %s", delivery.id, delivery.peer)
                    continue
                delivery.last_error = error[:1024]
                if delivery.attempts > self.config.delivery.max_retries:
                    delivery.state = DeliveryState.DEAD
                    logger.error("Delivery %d to %s is dead after %d attempts: %s", delivery.id,
                                 delivery.peer, delivery.attempts, error)
                else:
                    delay = self.backoff_s(delivery.attempts)
                    delivery.next_try_at = now + timedelta(seconds=delay)
                    logger.warning("Delivery %d to %s failed (attempt %d), next try in %.0f s: %s",
                                   delivery.id, delivery.peer, delivery.attempts, delay, error)

    def _audit(self, delivery: Delivery, error: str | None) -> None:
        peer = self.config.peers.get(delivery.peer)
        state = ("sent" if error is None else
                 "dead" if delivery.attempts > self.config.delivery.max_retries else "retry")
        self.audit.record("delivery", peer=delivery.peer,
                          called=peer.ae_title if peer else None,
                          address=f"{peer.host}:{peer.port}" if peer else None,
                          sop_instance_uid=delivery.sop_instance_uid, job=delivery.job_id,
                          attempt=delivery.attempts, outcome=state, error=error)
        metrics.delivery(delivery.peer, state)

    def run_once(self) -> int:
        """Send what is due; return how many objects were stored at their destination."""
        sent = 0
        for peer_name, items in self._claim().items():
            results: dict[int, str | None] = {}
            peer = self.config.peers.get(peer_name)
            if peer is None:
                results = {i: f"peer {peer_name!r} is no longer configured" for i, _ in items}
            else:
                target = Target(peer.name, peer.ae_title, peer.host, peer.port)
                paths = {i: self.queue.index.store.root / p for i, p in items}
                missing = {i: "stored object is missing" for i, p in paths.items()
                           if not p.exists()}
                present = {i: p for i, p in paths.items() if i not in missing}
                started = time.perf_counter()
                summary = send(self.config, target, list(present.values()))
                metrics.stage("deliver", time.perf_counter() - started)
                failures = {str(path): error for path, error in summary.failures}
                results = {**missing, **{i: failures.get(str(p)) for i, p in present.items()}}
            sent += sum(error is None for error in results.values())
            self._record(results)
        return sent
