"""The worker: claims report jobs and runs the model, in its own process(es).

``serve`` starts ``[worker] processes`` of them; ``msvlm-node worker`` runs one alone (a GPU
machine sharing the index over PostgreSQL and the file store). A claimed job holds a lease that
a heartbeat renews; a worker that dies loses the lease and another one takes the job over.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
from sqlalchemy import select

from node import metrics
from node.config import Config
from node.draft import Draft, ReportError, draft_study
from node.jobs import JobQueue, Outcome, default_owner
from node.selection import SeriesInfo, rules_for, select_series
from storage.index import NON_REPORTABLE_SOP_PREFIXES, Index, InstanceRecord
from storage.schema import Instance, Job, JobState, Series, Study

logger = logging.getLogger(__name__)

WORKER_NICENESS = 19
"""Niceness of the worker processes ``serve`` starts: the C-STORE path keeps the cores while
images arrive (streaming at niceness 10 cost up to 7% of ingest on 2 cores, at 19 none
measurable); an idle machine gives the workers all of them."""
STREAM_YIELD_SPOOL = 512
"""Streaming waits while more files than this wait in the spool (the indexer is far behind)."""


class Worker:
    """Runs report jobs until stopped.

    Parameters
    ----------
    config : Config
        The node's configuration (index, model, selection, report destinations).
    generator : ReportGenerator, optional
        A loaded checkpoint; default: ``[model] checkpoint`` on ``[model] device``.
    poll_s : float
        How often an idle worker looks for jobs (and slices to stream).
    wake : multiprocessing.Event, optional
        Set by the serving process when it queued a job: the worker starts it at once instead
        of at its next poll (a worker started alone, ``msvlm-node worker``, polls).
    delivered : multiprocessing.Event, optional
        Set by the worker when a finished job put objects in the outbox: the serving process
        sends them at once instead of at its next look.
    """

    def __init__(self, config: Config, generator: object = None, poll_s: float = 0.2,
                 wake: Any = None, delivered: Any = None) -> None:
        from models.generator import ReportGenerator

        self.config = config
        self.poll_s = poll_s
        self.wake, self.delivered = wake, delivered
        self.owner = default_owner()
        self.index = Index(config.storage.effective_database_url, config.file_store())
        self.queue = JobQueue(self.index, config)
        if config.model.threads:
            import torch

            torch.set_num_threads(config.model.threads)
        self.generator = generator or ReportGenerator.from_pretrained(
            config.model.checkpoint_path, config.model.device)
        self.rules = rules_for(config.selection, self.generator.card)  # type: ignore[attr-defined]
        self._stream_failed: set[int] = set()  # instances streaming could not read
        from storage.volumes import HeaderCache

        self._headers = HeaderCache()  # headers of streamed slices, not read again to draft

    def close(self) -> None:
        self.index.close()

    def reload(self) -> None:
        """SIGHUP from the serving process: read the config file again and use it for the next
        jobs ([selection], [report], [worker] stream, ...); an invalid file changes nothing
        (the serving process logged why)."""
        from node.config import ConfigError, reload_config

        try:
            config = reload_config(self.config, quiet=True)
        except ConfigError:
            return
        self.config = config
        self.queue.config = config
        self.rules = rules_for(config.selection, self.generator.card)  # type: ignore[attr-defined]

    def warm_up(self) -> None:
        """Draft a tiny synthetic study once, unsaved: the first real study then does not pay
        the first-call costs (imports, highdicom's SR machinery, torch kernels: ~1 s)."""
        import dataclasses
        import tempfile

        from storage.volumes import StudyInfo, write_ct_series

        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                paths = write_ct_series(tmp, np.full((16, 32, 32), -1000.0, np.float32),
                                        [float(k) for k in range(16)], (1.0, 1.0), "axial",
                                        "non_contrast", StudyInfo("1.2.826.0.1.3680043.10.1452.0"
                                                                  ".1", "WARMUP"))
                header = pydicom.dcmread(paths[0], stop_before_pixels=True)
                uid = str(header.SeriesInstanceUID)
                info = SeriesInfo(uid, "CT", "CHEST", "axial", "non_contrast", 16, False,
                                  ("ORIGINAL", "PRIMARY", "AXIAL"), True, 1, "")
                draft_study([info], {uid: paths}, self.generator,
                            dataclasses.replace(self.rules, min_slices=1, modalities=("*",),
                                                body_parts=("*",)),
                            self.index.device_uid, pdf=self.config.report.pdf,
                            key_images=self.config.report.key_images)
        except Exception as exc:  # noqa: BLE001 - only a warm-up: the real work decides
            logger.debug("Warm-up draft failed: %s", exc)
        logger.debug("Warm-up took %.2f s", time.perf_counter() - start)

    def run(self, stop: threading.Event) -> None:
        """Claim and run jobs until ``stop`` is set."""
        self.warm_up()
        version = str(getattr(self.generator, "version", "?"))
        metrics.model_loaded(version)
        logger.info("Worker %s ready (%s)", self.owner, version)
        while not stop.is_set():
            try:
                ran = self.run_once() or self.stream_once() > 0
            except Exception:  # noqa: BLE001 - the index may be briefly unavailable
                logger.exception("Worker loop error; continuing")
                ran = False
            if ran:
                continue
            if self.wake is None:
                stop.wait(self.poll_s)
            elif self.wake.wait(self.poll_s):  # stop is seen at the latest after poll_s
                self.wake.clear()

    def stream_once(self, batch: int = 16) -> int:
        """Encode up to ``batch`` slices of studies still arriving (``[worker] stream``) and
        keep their embeddings; return how many. Receiving comes first: nothing is done while
        more than :data:`STREAM_YIELD_SPOOL` files wait in the spool (what is left is encoded
        at completion). Slices of series the selection would skip are never encoded."""
        generator: Any = self.generator
        if not self.config.worker.stream or not generator.streamable:
            return 0
        if len(self.index.store.pending()) > STREAM_YIELD_SPOOL:
            return 0
        key = generator.stream_key
        rows = [(i, p, s) for i, p, s in self.index.unencoded(key, batch * 8)
                if i not in self._stream_failed and self._streamable_series(s)][:batch]
        if not rows:
            return 0
        from storage.volumes import VolumeError, read_slice

        by_modality: dict[str, list[tuple[int, Any]]] = defaultdict(list)
        for instance_id, path, series in rows:
            try:
                by_modality[series.modality or ""].append((instance_id,
                                                            read_slice(path, self._headers)))
            except (VolumeError, OSError) as exc:  # read again (and judged) at completion
                logger.debug("Streaming skips %s: %s", path.name, exc)
                self._stream_failed.add(instance_id)
        done: dict[int, bytes] = {}
        for modality, items in by_modality.items():
            shapes: dict[tuple[int, ...], list[tuple[int, Any]]] = defaultdict(list)
            for instance_id, pixels in items:
                shapes[pixels.shape].append((instance_id, pixels))
            for group in shapes.values():
                records = generator.stream_records(np.stack([p for _, p in group]), modality)
                done.update((i, r) for (i, _), r in zip(group, records))
        self.index.put_embeddings(key, done)
        metrics.streamed(len(done))
        if done:
            logger.debug("Streamed %d slices", len(done))
        return len(done)

    def _streamable_series(self, series: Series) -> bool:
        """Whether the selection could choose this series (its slice count aside: it grows)."""
        info = SeriesInfo(series.series_instance_uid, series.modality or "", series.body_part,
                          series.plane, series.phase, 1 << 30, series.is_localizer,
                          series.image_type.split("\\") if series.image_type else (), True,
                          series.series_number, series.series_description or "")
        return bool(select_series([info], self.rules).chosen)

    def run_once(self) -> bool:
        """Run one job if one is due; ``True`` when a job was run."""
        job = self.queue.claim(self.owner)
        if job is None:
            return False
        lost = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, lost), daemon=True)
        beat.start()
        try:
            outcome = self.process(job)
        except ReportError as exc:
            self.queue.fail(job.id, self.owner, f"not reported: {exc}", permanent=True)
            metrics.job("not_reported")
        except Exception as exc:  # noqa: BLE001 - stored; retried up to max_attempts
            reason = failure_reason(exc)
            logger.debug("Job %d: technical detail", job.id, exc_info=True)
            self.queue.fail(job.id, self.owner, reason, permanent=False)
            metrics.job("failed")
        else:
            if self.queue.succeed(job.id, self.owner, outcome):
                if self.delivered is not None and outcome.peers:
                    self.delivered.set()
                metrics.job("done", outcome.timings)
                logger.info("Job %d done: SR %s to %s (%s)", job.id,
                            outcome.sr_sop_instance_uid, ", ".join(outcome.peers) or "nobody",
                            ", ".join(f"{k} {v:.2f}" for k, v in outcome.timings.items()))
        finally:
            lost.set()
            beat.join()
        return True

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        while not done.wait(self.config.worker.lease_s / 3):
            if not self.queue.renew(job_id, self.owner):
                logger.warning("Job %d: lease lost", job_id)
                return

    def _study_series(self, job: Job) -> tuple[list[SeriesInfo], dict[str, list[Path]],
                                                list[str]]:
        """The study's series as the index classified them at ingest, the files of their image
        instances (SR, PDF and other non-images left out), and the peers that sent them."""
        root = self.index.store.root
        paths: dict[str, list[Path]] = defaultdict(list)
        images: dict[str, int] = defaultdict(int)
        senders: set[tuple[str, str]] = set()
        with self.index.sessions() as session:
            series = session.scalars(select(Series).where(Series.study_id == job.study_id)).all()
            rows = session.execute(select(Instance, Series.series_instance_uid).join(Series)
                                   .where(Series.study_id == job.study_id)).all()
        for instance, series_uid in rows:
            if instance.rows is None or instance.sop_class_uid.startswith(
                    NON_REPORTABLE_SOP_PREFIXES):
                continue
            paths[series_uid].append(root / instance.path)
            images[series_uid] += instance.number_of_frames or 1
            if instance.calling_ae_title and instance.source_address:
                senders.add((instance.calling_ae_title, instance.source_address))
        infos = [SeriesInfo(s.series_instance_uid, s.modality or "", s.body_part, s.plane,
                            s.phase, images[s.series_instance_uid], s.is_localizer,
                            s.image_type.split("\\") if s.image_type else (),
                            s.series_instance_uid in paths, s.series_number,
                            s.series_description or "") for s in series]
        return infos, paths, [f"{ae}@{addr}" for ae, addr in sorted(senders)]

    def _study_uid(self, job: Job) -> str:
        with self.index.sessions() as session:
            return str(session.scalars(select(Study.study_instance_uid).where(
                Study.id == job.study_id)).one())

    def _previous(self, job: Job) -> list[pydicom.Dataset]:
        with self.index.sessions() as session:
            done = session.scalars(select(Job.sr_path).where(
                Job.study_id == job.study_id, Job.state == JobState.DONE,
                Job.sr_path.is_not(None), Job.id != job.id).order_by(Job.id)).all()
        paths = [self.index.store.root / p for p in done if p]
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths if p.exists()]

    def _store(self, ds: pydicom.Dataset) -> str:
        """Store and index an object we made; its path relative to the store."""
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        final = self.index.store.write_final(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                             str(ds.SOPInstanceUID), buffer.getvalue())
        self.index.add([InstanceRecord.from_file(final)])
        return str(final.relative_to(self.index.store.root))

    def destinations(self, senders: list[str]) -> list[str]:
        """``[report] send_to`` plus, with ``send_back_to_sender``, the peers that sent."""
        peers = list(self.config.report.send_to)
        if self.config.report.send_back_to_sender:
            for sender in senders:
                ae, _, address = sender.partition("@")
                peer = self.config.peer_for_store(ae, address.rsplit(":", 1)[0])
                if peer is not None and peer.name not in peers:
                    peers.append(peer.name)
        return peers

    def process(self, job: Job) -> Outcome:
        """Draft one job's study and store the SR (and PDF)."""
        start = time.perf_counter()
        series, paths, senders = self._study_series(job)
        collect_s = time.perf_counter() - start
        generator: Any = self.generator
        cached = (self.index.embeddings_of_study(generator.stream_key, self._study_uid(job))
                  if self.config.worker.stream and generator.streamable else None)
        draft: Draft = draft_study(series, paths, self.generator, self.rules,
                                   self.index.device_uid, previous=self._previous(job),
                                   pdf=self.config.report.pdf,
                                   key_images=self.config.report.key_images, cached=cached,
                                   headers_known=self._headers)
        start = time.perf_counter()
        sr_path = self._store(draft.sr)
        pdf = (str(draft.pdf.SOPInstanceUID), self._store(draft.pdf)) if draft.pdf else None
        kos = (str(draft.kos.SOPInstanceUID), self._store(draft.kos)) if draft.kos else None
        timings = {"collect_s": collect_s, **draft.timings,
                   "store_s": time.perf_counter() - start}
        read = "; ".join(f"{s.series_number} {s.plane} {s.phase} ({s.images})"
                         for s in draft.selection.chosen)
        return Outcome(str(draft.sr.SOPInstanceUID), sr_path, pdf, draft.report.model_version,
                       read, timings, self.destinations(senders), kos)


def failure_reason(exc: BaseException) -> str:
    """A retried failure in words for the jobs list (the exception itself goes to the debug
    log): the disk, the index, or an internal error."""
    if isinstance(exc, OSError):
        return f"a file could not be read or written ({exc.strerror or 'I/O error'})"
    if type(exc).__module__.startswith("sqlalchemy"):
        return "the index database could not be reached"
    if isinstance(exc, MemoryError):
        return "out of memory while drafting"
    return "internal error while drafting (details in the node's debug log)"


def stop_on_signals(stop: threading.Event, interrupt: bool = True) -> Callable[[], None]:
    """SIGTERM (and SIGINT with ``interrupt``) set ``stop``; until the returned function is
    called (the model is loaded), they end the process at once: there is nothing to finish.

    At once means ``os._exit``: an exception raised from the handler would unwind through
    whatever the main thread is in (half-imported torch, an OpenMP pool starting) and the
    interpreter's shutdown could then abort (a worker stopped one second into loading once
    ended with SIGABRT). Nothing is lost: the index is not yet written, and an interrupted
    migration is one SQLite transaction, rolled back when the database is next opened."""
    loaded = threading.Event()

    def handler(*_: object) -> None:
        if not loaded.is_set():
            os._exit(0)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler if interrupt else signal.SIG_IGN)
    return loaded.set


def worker_process(config: Config, log_level: int, parent_pid: int | None = None,
                   wake: Any = None, delivered: Any = None) -> None:
    """Entry point of a worker process started by ``serve`` (spawned: a clean interpreter).
    It never outlives the node: the parent's death signals it, and a watcher stops it should
    the parent be gone before that signal was armed. ``wake`` and ``delivered``: see
    :class:`Worker`."""
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    from node.scp import set_parent_death_signal

    set_parent_death_signal(signal.SIGTERM)
    try:  # receiving first: on a busy machine the receiving processes win the cores
        os.nice(WORKER_NICENESS)
    except OSError:  # pragma: no cover - not permitted
        pass
    stop = threading.Event()
    loaded = stop_on_signals(stop, interrupt=False)
    if parent_pid is not None:
        if os.getppid() != parent_pid:
            return  # the node died while this process started

        def watch() -> None:
            while not stop.wait(1.0):
                if os.getppid() != parent_pid:
                    logger.warning("Node process gone: worker stops")
                    stop.set()

        threading.Thread(target=watch, name="msvlm-parent-watch", daemon=True).start()
    worker = Worker(config, wake=wake, delivered=delivered)
    signal.signal(signal.SIGHUP, lambda *_: worker.reload())
    # serve starts workers with SIGHUP blocked: a reload sent while the model loaded is
    # delivered now, to the handler
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    loaded()
    try:
        worker.run(stop)
    finally:
        worker.close()
