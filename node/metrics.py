"""Metrics, health and readiness: ``[metrics] listen`` and ``msvlm-node status``.

Counters and histograms are kept with ``prometheus_client`` in its multiprocess mode: ``serve``
points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh ``<storage root>/run/metrics`` before any process
counts, so the receiving processes (forked) and the workers (spawned) write their own files and a
scrape adds them up. What the index already knows (jobs, deliveries, studies waiting, spool
depth, free space) is read when scraped, so it is never stale and never double-counted.

Label values are AE titles, peer names, statuses, reasons, stages and the model version; never
patient name, ID, birth date or a UID.

Outside ``serve`` (tests running the node in-process, one-shot commands) the same calls count in
this process's default registry; nothing is written to disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
SPOOL_LAG_READY_S = 60.0
"""``/readyz`` fails when the oldest received, not yet indexed instance is older than this."""
STAGES = ("collect", "load", "encode", "generate", "sr", "deliver")
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def run_dir(config: Any) -> Path:
    """``<root>/run`` (``<root>/run/<node_id>`` when several nodes share the root)."""
    base = Path(config.storage.root) / "run"
    return base / config.node.node_id if config.node.node_id else base


def metrics_dir(config: Any) -> Path:
    return run_dir(config) / "metrics"


def prepare(config: Any) -> Path:
    """``serve`` only, before any metric exists: an empty multiprocess directory, named in the
    environment that receiving processes and workers inherit."""
    folder = metrics_dir(config)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(folder)
    return folder


class _Metrics:
    """The node's metric objects, created on first use (after :func:`prepare`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.instances = Counter("msvlm_instances_received", "C-STORE requests answered, by "
                                 "status and calling AE title", ["calling_ae", "status"])
        self.bytes = Counter("msvlm_received_bytes", "Data set bytes received by C-STORE",
                             ["calling_ae"])
        self.associations = Counter("msvlm_associations", "Associations accepted and rejected "
                                    "(reason: called_ae_title, unknown_calling_ae, "
                                    "max_associations, max_associations_per_address)",
                                    ["result", "reason"])
        self.deliveries = Counter("msvlm_delivery_attempts", "Delivery attempts by peer and "
                                  "outcome (sent, retry, dead)", ["peer", "outcome"])
        self.jobs = Counter("msvlm_jobs_finished", "Report jobs finished by this node's workers "
                            "(done, failed, not_reported)", ["result"])
        self.stage = Histogram("msvlm_job_stage_seconds", "Duration of each stage of a report "
                               "job", ["stage"], buckets=_BUCKETS)
        self.streamed = Counter("msvlm_slices_streamed", "Slices encoded while their study was "
                                "still arriving")
        # an info metric (the version is the label); its value counts the workers holding it
        self.model = Gauge("msvlm_model_info", "Model version loaded, by the number of workers "
                           "that hold it", ["version"], multiprocess_mode="livesum")


_lock = threading.Lock()
_metrics: _Metrics | None = None


def m() -> _Metrics:
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


REASONS = {(0x01, 0x01, 0x03): "unknown_calling_ae", (0x01, 0x01, 0x07): "called_ae_title",
           (0x02, 0x03, 0x02): "max_associations"}


def association(accepted: bool, rejection: tuple[int, int, int] | None = None,
                reason: str | None = None) -> None:
    reason = reason or (REASONS.get(tuple(rejection), "other") if rejection else "")
    m().associations.labels("accepted" if accepted else "rejected", reason).inc()


def instance(calling_ae: str, status: str, nbytes: int) -> None:
    metrics = m()
    metrics.instances.labels(calling_ae, status).inc()
    metrics.bytes.labels(calling_ae).inc(nbytes)


def delivery(peer: str, outcome: str) -> None:
    m().deliveries.labels(peer, outcome).inc()


def job(result: str, timings: dict[str, float] | None = None) -> None:
    metrics = m()
    metrics.jobs.labels(result).inc()
    for key, value in (timings or {}).items():
        stage = key.removesuffix("_s")
        if stage in STAGES:
            metrics.stage.labels(stage).observe(value)


def stage(name: str, seconds: float) -> None:
    m().stage.labels(name).observe(seconds)


def streamed(slices: int) -> None:
    if slices:
        m().streamed.inc(slices)


def model_loaded(version: str, loaded: bool = True) -> None:
    m().model.labels(version).set(1 if loaded else 0)


def process_dead(pid: int) -> None:
    """A receiving process or worker exited: its live gauges no longer count."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# -- reading: the scrape, the readiness checks and ``status`` ------------------------------------

class NodeCollector:
    """Gauges read from the index and the file system at scrape time."""

    def __init__(self, config: Any, index: Any) -> None:
        self.config = config
        self.index = index

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        facts = node_facts(self.config, self.index)
        g = GaugeMetricFamily("msvlm_spool_depth", "Received instances not yet indexed")
        g.add_metric([], facts["spool_depth"])
        yield g
        g = GaugeMetricFamily("msvlm_indexing_lag_seconds", "Age of the oldest received, not "
                              "yet indexed instance (0 when none)")
        g.add_metric([], facts["indexing_lag_s"])
        yield g
        g = GaugeMetricFamily("msvlm_studies_waiting", "Studies receiving or waiting for "
                              "completion (no report job yet)")
        g.add_metric([], facts["studies_waiting"])
        yield g
        g = GaugeMetricFamily("msvlm_jobs", "Report jobs by state", labels=["state"])
        for state, count in facts["jobs"].items():
            g.add_metric([state], count)
        yield g
        g = GaugeMetricFamily("msvlm_deliveries", "Deliveries by state (dead: dead letters)",
                              labels=["state"])
        for state, count in facts["deliveries"].items():
            g.add_metric([state], count)
        yield g
        g = GaugeMetricFamily("msvlm_storage_free_bytes", "Free bytes on the storage file "
                              "system")
        g.add_metric([], facts["free_bytes"])
        yield g
        g = GaugeMetricFamily("msvlm_instances_stored", "Instances in the index")
        g.add_metric([], facts["instances"])
        yield g


def node_facts(config: Any, index: Any) -> dict[str, Any]:
    """What the index and the storage file system say now (no PHI)."""
    from sqlalchemy import func, select

    from storage.schema import Delivery, Job, Study

    store = index.store
    pending = store.pending()  # oldest first
    lag = 0.0
    if pending:
        try:
            lag = max(0.0, time.time() - pending[0].stat().st_mtime)
        except OSError:  # indexed meanwhile
            pass
    with index.sessions() as s:
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        deliveries = dict(s.execute(select(Delivery.state, func.count())
                                    .group_by(Delivery.state)).all())
        waiting = s.scalar(select(func.count()).select_from(Study).where(
            ~select(Job.id).where(Job.study_id == Study.id).exists())) or 0
        instances = index.instance_count()
    return {"spool_depth": len(pending), "indexing_lag_s": lag,
            "studies_waiting": int(waiting), "jobs": {_name(k): v for k, v in jobs.items()},
            "deliveries": {_name(k): v for k, v in deliveries.items()},
            "free_bytes": store.free_bytes(), "instances": instances}


def _name(state: Any) -> str:
    return str(getattr(state, "value", state))


def registry(config: Any, index: Any | None, folder: str | None = None) -> Any:
    """The registry a scrape reads: every process's counters (from ``folder``, default the
    multiprocess folder of this ``serve``) plus the index's gauges."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = folder or os.environ.get(ENV)
    if folder:
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=folder)
    else:
        reg = CollectorRegistry()
        reg.register(_Forward(REGISTRY))
    if index is not None:
        reg.register(NodeCollector(config, index))
    return reg


class _Forward:
    """This process's default registry inside another registry (in-process use)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        yield from self.source.collect()


def readiness(config: Any, index: Any, reg: Any | None = None) -> list[tuple[str, bool, str]]:
    """``(check, ok, detail)`` for each readiness check."""
    checks: list[tuple[str, bool, str]] = []
    try:
        facts = node_facts(config, index)
        checks.append(("index", True, "reachable"))
    except Exception as exc:  # noqa: BLE001 - any database error means "not ready"
        return [("index", False, f"unreachable: {type(exc).__name__}")]
    floor = config.storage.min_free_bytes
    probe = index.store.tmp / f".ready-{os.getpid()}-{threading.get_ident()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
        writable = True
    except OSError as exc:
        writable, why = False, exc.strerror
    if not writable:
        checks.append(("storage", False, f"not writable: {why}"))
    elif facts["free_bytes"] < floor:
        checks.append(("storage", False, f"{facts['free_bytes']} bytes free, below "
                                         f"min_free_bytes {floor}"))
    else:
        checks.append(("storage", True, f"{facts['free_bytes']} bytes free"))
    lag = facts["indexing_lag_s"]
    checks.append(("spool", lag < SPOOL_LAG_READY_S,
                   f"{facts['spool_depth']} waiting, oldest {lag:.0f} s"))
    if config.worker.processes == 0:
        checks.append(("worker", True, "no workers configured"))
    else:
        loaded = sum(value for labels, value in sample_values(
            reg or registry(config, None), "msvlm_model_info"))
        checks.append(("worker", loaded > 0, f"{int(loaded)} with the model loaded"))
    return checks


def sample_values(reg: Any, name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample of metric ``name`` (counters: their ``_total``)."""
    out = []
    for family in reg.collect():
        if family.name != name and family.name + "_total" != name:
            continue
        for sample in family.samples:
            if sample.name in (name, name + "_total"):
                out.append((dict(sample.labels), float(sample.value)))
    return out


# -- HTTP ----------------------------------------------------------------------------------------

class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``[metrics] listen`` (a thread of ``serve``).

    The index handle is the serving process's own, used only by scrape threads."""

    def __init__(self, config: Any, index: Any) -> None:
        self.config = config
        self.index = index
        address = config.metrics.address
        assert address is not None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.handle(self)

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("metrics: " + fmt, *args)

        self.httpd = ThreadingHTTPServer(address, Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.5,),
                                        name="msvlm-metrics", daemon=True)
        self._thread.start()
        logger.info("Metrics, /healthz and /readyz on http://%s:%d", *self.httpd.server_address[:2])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                body = generate_latest(registry(self.config, self.index))
                self._send(request, 200, body, CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(request, 200, b"ok\n")
            elif path == "/readyz":
                checks = readiness(self.config, self.index)
                ok = all(c[1] for c in checks)
                text = "".join(f"{name}: {'ok' if good else 'FAIL'} ({detail})\n"
                               for name, good, detail in checks)
                self._send(request, 200 if ok else 503, text.encode())
            else:
                self._send(request, 404, b"not found: /metrics, /healthz, /readyz\n")
        except Exception as exc:  # noqa: BLE001 - a scrape never takes the node down
            logger.error("Metrics request %s failed: %s", path, exc)
            self._send(request, 500, f"error: {type(exc).__name__}\n".encode())

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, code: int, body: bytes,
              content_type: str = "text/plain; charset=utf-8") -> None:
        request.send_response(code)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


# -- the running node's identity (for ``status``) ------------------------------------------------

def state_file(config: Any) -> Path:
    return run_dir(config) / "node.json"


def write_state(config: Any, port: int) -> None:
    """``serve``: who is running (pid, start time, port), for ``msvlm-node status``."""
    path = state_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "ae_title": config.node.ae_title,
                               "port": port, "started_at": datetime.now(timezone.utc)
                               .isoformat(timespec="seconds"),
                               "metrics": config.metrics.listen}))
    os.replace(tmp, path)


def read_state(config: Any) -> dict[str, Any] | None:
    """The state ``serve`` wrote, with ``running`` (its process is alive)."""
    try:
        state = json.loads(state_file(config).read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(int(state["pid"]), 0)
        state["running"] = True
    except (OSError, ValueError, KeyError):
        state["running"] = False
    return state


# -- ``msvlm-node status`` -----------------------------------------------------------------------

def status_text(config: Any, index: Any) -> tuple[str, bool]:
    """The node at a glance for a terminal, from the index, the node's state file and the
    metric files its processes write (no HTTP); and whether the node is ready."""
    from sqlalchemy import func, select

    from storage.schema import Delivery, Job, Series, Study

    state = read_state(config)
    folder = metrics_dir(config)
    live = state is not None and state["running"] and folder.is_dir()
    reg = registry(config, None, str(folder)) if live else None
    lines = []
    if state is None:
        lines.append(f"Node        {config.node.ae_title}: never started with this storage root")
    else:
        started = datetime.fromisoformat(state["started_at"])
        up = datetime.now(timezone.utc) - started
        lines.append(f"Node        {state['ae_title']} on port {state['port']}, "
                     + (f"running (pid {state['pid']}) since {state['started_at']}, uptime "
                        f"{str(up).split('.')[0]}" if state["running"]
                        else f"NOT RUNNING (last started {state['started_at']})"))
    versions = ({labels["version"]: v for labels, v in
                 sample_values(reg, "msvlm_model_info") if v > 0} if reg else {})
    lines.append(f"Model       {config.model.checkpoint}; "
                 + (", ".join(f"version {k} in {int(v)} worker(s)" for k, v in versions.items())
                    if versions else "no worker has it loaded"))
    lines.append("Metrics     " + (f"http://{config.metrics.listen}/metrics"
                                   if config.metrics.listen else "no listener ([metrics] listen)"))
    for peer in config.peers.values():
        lines.append(f"Peer        {peer.name}: {peer.ae_title} @ {peer.host}:{peer.port}"
                     + (" (may store)" if peer.allow_store else ""))
    facts = node_facts(config, index)
    with index.sessions() as s:
        studies = s.scalar(select(func.count()).select_from(Study)) or 0
        series = s.scalar(select(func.count()).select_from(Series)) or 0
        errors = s.execute(select(Job.id, Job.finished_at, Job.error).where(
            Job.error.is_not(None)).order_by(Job.finished_at.desc()).limit(5)).all()
        dead = s.execute(select(Delivery.id, Delivery.peer, Delivery.last_error).where(
            Delivery.last_error.is_not(None)).order_by(Delivery.id.desc()).limit(5)).all()
    lines.append(f"Index       {studies} studies, {series} series, {facts['instances']} "
                 f"instances; {facts['studies_waiting']} waiting for completion")
    lines.append(f"Spool       {facts['spool_depth']} not yet indexed (oldest "
                 f"{facts['indexing_lag_s']:.0f} s); {facts['free_bytes'] / 1e9:.1f} GB free")
    if reg is not None:
        received = sample_values(reg, "msvlm_instances_received")
        by_status: dict[str, float] = {}
        for labels, v in received:
            by_status[labels["status"]] = by_status.get(labels["status"], 0) + v
        assoc = sample_values(reg, "msvlm_associations")
        accepted = sum(v for labels, v in assoc if labels["result"] == "accepted")
        rejected = {labels["reason"]: v for labels, v in assoc if labels["result"] == "rejected"}
        lines.append(f"Received    {int(sum(by_status.values()))} instances since start ("
                     + (", ".join(f"{k}: {int(v)}" for k, v in sorted(by_status.items()))
                        or "none") + f"); {int(accepted)} associations accepted, "
                     f"{int(sum(rejected.values()))} rejected"
                     + (" (" + ", ".join(f"{k}: {int(v)}" for k, v in rejected.items()) + ")"
                        if rejected else ""))
    lines.append("Jobs        " + (", ".join(f"{k} {v}" for k, v in sorted(facts["jobs"].items()))
                                   or "none"))
    lines.append("Deliveries  " + (", ".join(f"{k} {v}" for k, v in
                                             sorted(facts["deliveries"].items())) or "none"))
    for job_id, when, error in errors:
        lines.append(f"Job error   job {job_id} ({when:%Y-%m-%d %H:%M:%S} UTC): {error}")
    for delivery_id, peer, error in dead:
        lines.append(f"Send error  delivery {delivery_id} to {peer}: {error}")
    ready = True
    if live:
        checks = readiness(config, index, reg)
        ready = all(ok for _, ok, _ in checks)
        lines.append("Ready       " + ("yes" if ready else "NO") + " ("
                     + "; ".join(f"{name} {'ok' if ok else 'FAIL'}: {detail}"
                                 for name, ok, detail in checks) + ")")
    else:
        ready = False
        lines.append("Ready       NO (the node is not running)")
    return "\n".join(lines), ready
