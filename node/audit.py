"""The audit trail: one JSON line per association and per delivery attempt.

What an admin shows when someone asks "did the scanner send it, and did the PACS get the
draft?": calling and called AE titles, address, accepted or rejected and why, instances by
status, study UIDs, bytes, duration; per delivery the peer, object UID, outcome and attempt.
Never patient name, ID or birth date. Each line is appended with its own ``open``/``write``
(``O_APPEND``: lines from several processes never interleave), so a rotated file needs no
reopen; ``[audit] journal = true`` also logs the line (logger ``node.audit``).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from node.config import Config

logger = logging.getLogger("node.audit")


class AuditTrail:
    """Appends audit lines to ``[audit] path`` (under the storage root) and/or the log."""

    def __init__(self, path: Path | None, journal: bool = False) -> None:
        self.path = path
        self.journal = journal

    @classmethod
    def from_config(cls, config: Config) -> AuditTrail:
        return cls(config.audit.file(config.storage.root), config.audit.journal)

    def record(self, event: str, **fields: Any) -> None:
        """Append one line ``{"time": ..., "event": event, **fields}``; an audit file that
        cannot be written is logged, never raised (the DICOM service goes on)."""
        line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                           "event": event, **fields}, separators=(",", ":"), default=str)
        if self.journal:
            logger.info("%s", line)
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:
            logger.error("Audit line not written to %s: %s", self.path, exc.strerror)
