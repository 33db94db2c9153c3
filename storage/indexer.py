"""The indexer: drains the store's ``incoming/`` spool into the index, in batches."""

from __future__ import annotations

import logging
import os
import threading

from storage.index import Index

logger = logging.getLogger(__name__)


class Indexer:
    """Background thread that indexes spooled files.

    One commit covers a whole batch, so a burst of instances costs a few commits, not one per
    instance. The same code reconciles after a crash: whatever is in ``incoming/`` at start-up
    is indexed first.

    Parameters
    ----------
    index : Index
        The index (and its file store).
    poll_s : float
        How often an idle indexer looks at the spool, in seconds.
    batch : int
        Most files per transaction.
    niceness : int
        Scheduling niceness of the indexing thread (Linux applies it per thread).
    """

    def __init__(self, index: Index, poll_s: float = 0.1, batch: int = 500,
                 niceness: int = 10) -> None:
        self.index = index
        self.niceness = niceness
        self.poll_s = poll_s
        self.batch = batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one drain at a time (this thread or a caller's)

    def run_once(self) -> int:
        """Index what is spooled now, then apply the association release records spooled
        before (each after its association's instances); return how many files were indexed."""
        total = 0
        with self._lock:
            releases = self.index.store.releases()
            while True:
                pending = self.index.store.pending()[: self.batch]
                if not pending:
                    break
                total += self.index.drain(pending)
            if releases:
                self.index.apply_releases(releases)
            return total

    def _loop(self) -> None:
        # Receiving answers senders and must not wait for indexing: under load this thread
        # yields the cores to the receiving processes and catches up when they idle.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.niceness)
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            pass
        delay = self.poll_s
        while not self._stop.is_set():
            try:
                count = self.run_once()
                if count:
                    logger.debug("Indexed %d instances", count)
                delay = self.poll_s
            except Exception:  # noqa: BLE001 - keep serving; files stay spooled
                logger.exception("Indexing failed; spooled files are kept and retried")
                delay = min(delay * 2, 30.0)
            self._stop.wait(delay)
        try:
            self.run_once()
        except Exception:  # noqa: BLE001
            logger.exception("Final indexing failed; files stay spooled for the next start")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="msvlm-indexer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
