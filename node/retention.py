"""Retention: studies older than ``[storage] retention_days`` (newest instance) are removed,
files and rows, once their jobs are settled and their drafts delivered or dead.

``msvlm-node purge`` runs it by hand (``--older-than``, ``--dry-run``); ``serve`` runs it once
a day when ``retention_days`` is set. Counts and bytes are logged, never patient data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from storage.index import Index

logger = logging.getLogger(__name__)


@dataclass
class PurgeResult:
    studies: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def purge(index: Index, older_than_days: float, dry_run: bool = False,
          now: datetime | None = None) -> PurgeResult:
    """Remove (or with ``dry_run`` only list) the studies whose newest instance is older than
    ``older_than_days``, never one with an open job or an undelivered draft."""
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)
    result = PurgeResult(index.purgeable(now - timedelta(days=older_than_days)))
    if dry_run:
        return result
    for uid in result.studies:
        result.bytes_freed += index.purge(uid)
    if result.studies:
        logger.info("Purged %d studies older than %g days, %.1f MB freed", len(result.studies),
                    older_than_days, result.bytes_freed / 1e6)
    return result
