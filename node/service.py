"""The running node: receiving processes, the indexer, completion and delivery, the workers.

``serve`` binds the port, forks ``receive_processes`` children that share the listening socket
(each a pynetdicom server writing into the spool), then reconciles and runs the indexer in the
parent. Children never touch the database, so ingest scales over cores without write contention;
they die with the parent (PR_SET_PDEATHSIG) and are restarted if they die alone. The parent also
runs the scheduler (completion scan, delivery) and spawns ``[worker] processes`` model workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

from node import metrics
from node.completion import Scheduler
from node.config import Config, ConfigError, reload_config
from node.jobs import JobQueue
from node.scp import (
    ADDRESS_BUCKETS, STUDY_BUCKETS, Receiver, listen_socket, set_parent_death_signal,
)
from node.worker import worker_process
from storage.index import Index
from storage.indexer import Indexer

logger = logging.getLogger(__name__)

WORKER_RESTART_S = 60.0
"""Least time between two starts of one worker process."""


def _receive_process(config: Config, sock: socket.socket, active: Any, slot: int,
                     per_address: Any, open_studies: Any) -> None:
    set_parent_death_signal(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    store = config.file_store()
    receiver = Receiver(config, store, sock, active, slot, per_address, open_studies)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: _reload_receiver(receiver))
    receiver.start()
    while not stop.wait(1.0):
        if os.getppid() == 1:  # parent gone before the death signal was armed
            break
    receiver.stop()


def _reload_receiver(receiver: Receiver) -> None:
    """SIGHUP in a receiving process (sent by the serving process after its own reload)."""
    try:
        receiver.reload(reload_config(receiver.config, quiet=True))
    except ConfigError:
        pass  # the serving process logged it and kept its configuration


class Node:
    """The whole node in one object (``msvlm-node serve`` runs :meth:`serve`).

    Parameters
    ----------
    config : Config
        The validated configuration.
    processes : int, optional
        Receiving processes; default ``[node] receive_processes``. With ``1`` the receiver runs
        as threads of this process (what the in-process tests use).
    """

    def __init__(self, config: Config, processes: int | None = None) -> None:
        self.config = config
        self.processes = processes or config.node.effective_receive_processes
        self.sock: socket.socket | None = None
        self.receiver: Receiver | None = None
        self.children: list[multiprocessing.process.BaseProcess] = []
        self.active: Any = None
        self.index: Index | None = None
        self.indexer: Indexer | None = None
        self.scheduler: Scheduler | None = None
        self.workers: list[multiprocessing.process.BaseProcess] = []
        self.metrics_server: metrics.MetricsServer | None = None
        self._worker_started: dict[int, float] = {}
        self._ctx = multiprocessing.get_context("fork")
        # Workers load PyTorch: a fresh interpreter, not a fork of this threaded process.
        self._worker_ctx = multiprocessing.get_context("spawn")
        # queued job -> worker n starts it; finished job -> the outbox is sent (no polling wait)
        self._job_wakes: dict[int, Any] = {}
        self._outbox_wake = self._worker_ctx.Event()

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        """Bind, start receiving, reconcile the spool and start the indexer; returns at once."""
        cfg = self.config
        store = cfg.file_store()
        leftover = store.cleanup_tmp()
        if leftover:
            logger.info("Removed %d partial files left by an earlier stop (never acknowledged)",
                        leftover)
        self.sock = listen_socket(cfg)
        self.active = self._ctx.Array("i", self.processes)
        self.per_address = self._ctx.Array("i", self.processes * ADDRESS_BUCKETS)
        self.open_studies = self._ctx.Array("i", self.processes * STUDY_BUCKETS)
        if self.processes == 1:
            self.receiver = Receiver(cfg, store, self.sock, self.active, 0, self.per_address,
                                     self.open_studies)
            self.receiver.start()
        else:
            # Fork before any thread of ours exists, so children start from a clean state.
            for slot in range(self.processes):
                self.children.append(self._spawn(slot))
        self.index = Index(cfg.storage.effective_database_url, store)
        pending = len(store.pending())
        self.indexer = Indexer(self.index)
        if pending:
            logger.info("Reconciling: %d received instances not yet indexed", pending)
            self.indexer.run_once()
        self.indexer.start()
        self.scheduler = Scheduler(JobQueue(self.index, cfg), cfg,
                                   before_scan=self.indexer.run_once,
                                   on_queued=self._wake_workers, outbox_wake=self._outbox_wake)
        self.scheduler.start()
        self.workers = [self._spawn_worker(n) for n in range(cfg.worker.processes)]
        if cfg.metrics.address is not None:
            try:
                self.metrics_server = metrics.MetricsServer(cfg, self.index)
            except OSError as exc:  # the DICOM service goes on without its metrics
                logger.error("[metrics] listen = %r: cannot listen (%s); no /metrics",
                             cfg.metrics.listen, exc.strerror)
            else:
                self.metrics_server.start()
        try:
            metrics.write_state(cfg, self.port)
        except OSError as exc:
            logger.warning("Node state for 'msvlm-node status' not written: %s", exc.strerror)
        logger.info("Listening as %r on %s:%d with %d receiving process(es) and %d worker(s); "
                    "storage %s", cfg.node.ae_title, cfg.node.bind_address, self.port,
                    self.processes, len(self.workers), cfg.storage.root)

    def _wake_workers(self) -> None:
        for event in self._job_wakes.values():
            event.set()

    def _spawn_worker(self, n: int) -> multiprocessing.process.BaseProcess:
        self._worker_started[n] = time.monotonic()
        wake = self._job_wakes.setdefault(n, self._worker_ctx.Event())
        proc = self._worker_ctx.Process(
            target=worker_process, name=f"msvlm-worker-{n}", daemon=True,
            args=(self.config, logging.getLogger().getEffectiveLevel(), os.getpid(), wake,
                  self._outbox_wake))
        # the worker starts with SIGHUP blocked (the mask survives exec) until its handler is in
        # place, so a reload while it loads the model is not its end
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        return proc

    def _spawn(self, slot: int) -> multiprocessing.process.BaseProcess:
        assert self.sock is not None
        self.active[slot] = 0
        for counts, buckets in ((self.per_address, ADDRESS_BUCKETS),
                                (self.open_studies, STUDY_BUCKETS)):
            with counts.get_lock():  # a dead process's associations are gone with it
                counts[slot * buckets:(slot + 1) * buckets] = [0] * buckets
        proc = self._ctx.Process(target=_receive_process, name=f"msvlm-receive-{slot}",
                                 args=(self.config, self.sock, self.active, slot,
                                       self.per_address, self.open_studies), daemon=True)
        proc.start()
        return proc

    def supervise(self) -> None:
        """Restart receiving and worker processes that died on their own."""
        for slot, proc in enumerate(self.children):
            if not proc.is_alive():
                logger.error("Receiving process %d exited with %s; restarting", slot,
                             proc.exitcode)
                metrics.process_dead(proc.pid or 0)
                self.children[slot] = self._spawn(slot)
        for n, proc in enumerate(self.workers):
            if proc.is_alive():
                continue
            # a worker that cannot start (say, out of memory loading the model) is restarted
            # at most once a minute; receiving goes on meanwhile
            if time.monotonic() - self._worker_started.get(n, 0.0) < WORKER_RESTART_S:
                continue
            logger.error("Worker process %d exited with %s; restarting (its job's lease "
                         "expires and the job is taken over)", n, proc.exitcode)
            metrics.process_dead(proc.pid or 0)
            self.workers[n] = self._spawn_worker(n)

    def stop(self) -> None:
        """Stop receiving, index what was received, close everything."""
        if self.receiver is not None:
            self.receiver.stop()
        for proc in self.children:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.children:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        if self.sock is not None:
            self.sock.close()
        for proc in self.workers:
            if proc.is_alive():
                proc.terminate()
        for proc in self.workers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.indexer is not None:
            self.indexer.stop()
        if self.index is not None:
            self.index.close()
        logger.info("Stopped")

    def reload(self) -> bool:
        """Read the config file again (SIGHUP, ``systemctl reload``) and apply it everywhere:
        here (completion, delivery, peers), in the receiving processes and the workers (each
        re-reads the same file on SIGHUP). An invalid file changes nothing (one error naming
        file, key and rule); keys that need a restart are logged and left as they were."""
        try:
            config = reload_config(self.config)
        except ConfigError as exc:
            logger.error("Configuration not reloaded, the running one stays: %s", exc)
            return False
        self.config = config
        if self.receiver is not None:
            self.receiver.reload(config)
        if self.scheduler is not None:
            self.scheduler.reload(config)
        if self.metrics_server is not None:
            self.metrics_server.config = config  # the readiness floor, for the next request
        for proc in [*self.children, *self.workers]:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGHUP)
        logger.info("Configuration reloaded from %s: %d peers", config.path, len(config.peers))
        return True

    def serve(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
        stop, reload, wake = threading.Event(), threading.Event(), threading.Event()

        def on(event: threading.Event) -> Callable[..., None]:
            return lambda *_: (event.set(), wake.set())

        signal.signal(signal.SIGTERM, on(stop))
        signal.signal(signal.SIGINT, on(stop))
        signal.signal(signal.SIGHUP, on(reload))
        # every process of this node counts into one folder (before any metric exists)
        metrics.prepare(self.config)
        self.start()
        try:
            while not stop.is_set():
                wake.wait(1.0)
                wake.clear()
                if stop.is_set():
                    break
                if reload.is_set():
                    reload.clear()
                    self.reload()
                self.supervise()
        finally:
            self.stop()


def wait_for_index(index: Index, count: int, timeout_s: float = 30.0) -> bool:
    """Wait until the index holds at least ``count`` instances (a helper for tools and tests)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if index.instance_count() >= count:
            return True
        time.sleep(0.1)
    return False
