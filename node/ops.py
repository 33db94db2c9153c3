"""Operator commands for the pipeline: ``worker``, ``jobs``, ``requeue``, ``deliveries``,
``resend``."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from typing import Any

from node.config import Config, load_config


def _queue(config: Config) -> Any:
    from node.jobs import JobQueue
    from storage.index import Index

    return JobQueue(Index(config.storage.effective_database_url, config.file_store()),
                    config)


def cmd_worker(args: argparse.Namespace) -> int:
    from node.worker import Worker, stop_on_signals

    stop = threading.Event()
    loaded = stop_on_signals(stop)  # a SIGTERM while the model loads: exit 0 at once
    worker = Worker(load_config(args.config))
    signal.signal(signal.SIGHUP, lambda *_: worker.reload())  # re-read the file
    loaded()
    try:
        worker.run(stop)
    finally:
        worker.close()
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:

    rows = _queue(load_config(args.config)).jobs(args.limit)
    print(f"{'JOB':>5}  {'STATE':<8} {'TRY':>3}  {'CREATED (UTC)':<19}  {'STUDY INSTANCE UID':<64}"
          "  RESULT")
    for job, study_uid in rows:
        if job.state.value == "done":
            times = json.loads(job.timings or "{}")
            result = f"SR {job.sr_sop_instance_uid} ({job.series_read}; " \
                     f"{sum(v for k, v in times.items() if k.endswith('_s')):.1f} s)"
        else:
            result = job.error or ""
        print(f"{job.id:>5}  {job.state.value:<8} {job.attempts:>3}  "
              f"{job.created_at:%Y-%m-%d %H:%M:%S}  {study_uid:<64}  {result}")
    print(f"{len(rows)} job(s)")
    return 0


def cmd_deliveries(args: argparse.Namespace) -> int:
    from storage.schema import DeliveryState

    state = DeliveryState(args.state) if args.state else None
    rows = _queue(load_config(args.config)).deliveries(args.limit, state)
    print(f"{'ID':>5} {'JOB':>5}  {'PEER':<16} {'STATE':<8} {'TRY':>3}  {'NEXT TRY (UTC)':<19}  "
          "LAST ERROR")
    for d in rows:
        next_try = f"{d.next_try_at:%Y-%m-%d %H:%M:%S}" if d.state.value == "pending" else ""
        print(f"{d.id:>5} {d.job_id:>5}  {d.peer:<16} {d.state.value:<8} {d.attempts:>3}  "
              f"{next_try:<19}  {d.last_error or ''}")
    print(f"{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:

    if not (args.ids or args.job or args.dead):
        print("msvlm-node: name delivery IDs, --job JOB or --dead")
        return 2
    count = _queue(load_config(args.config)).resend(args.ids, args.job or (), args.dead)
    print(f"Queued {count} deliver{'y' if count == 1 else 'ies'} again; the running node sends "
          "them within seconds")
    return 0 if count else 1


def cmd_requeue(args: argparse.Namespace) -> int:

    count = _queue(load_config(args.config)).requeue(args.ids)
    print(f"Queued {count} failed job(s) again; the running node's workers take them within "
          "seconds")
    return 0 if count == len(set(args.ids)) else 1


def cmd_purge(args: argparse.Namespace) -> int:
    from node.retention import purge

    config = load_config(args.config)
    days = args.older_than if args.older_than is not None else config.storage.retention_days
    if not days:
        print("Nothing to do: [storage] retention_days is 0 (keep forever) and no --older-than")
        return 2
    result = purge(_queue(config).index, days, dry_run=args.dry_run)
    if args.dry_run:
        for uid in result.studies:
            print(uid)
        print(f"Would purge {len(result.studies)} stud{'y' if len(result.studies) == 1 else 'ies'}"
              f" older than {days:g} days")
    else:
        print(f"Purged {len(result.studies)} stud{'y' if len(result.studies) == 1 else 'ies'} "
              f"older than {days:g} days; {result.bytes_freed / 1e6:.1f} MB freed")
    return 0


def add_pipeline_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    def add(name: str, func: Any, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(func=func)
        return p

    add("worker", cmd_worker, "run one report worker in the foreground (e.g. on a GPU machine "
                              "sharing the index and the storage)")
    p = add("jobs", cmd_jobs, "list report jobs, newest first, with results or stored reasons")
    p.add_argument("--limit", type=int, default=50)
    p = add("requeue", cmd_requeue, "run failed report jobs again (e.g. after a configuration "
                                    "fix)")
    p.add_argument("ids", nargs="+", type=int, help="job IDs")
    p = add("deliveries", cmd_deliveries, "list deliveries of drafts (the outbox), newest first")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--state", choices=["pending", "sent", "dead"], default=None)
    p = add("resend", cmd_resend, "queue deliveries again (dead letters, or any)")
    p.add_argument("ids", nargs="*", type=int, help="delivery IDs")
    p.add_argument("--job", type=int, action="append", help="every delivery of this job")
    p.add_argument("--dead", action="store_true", help="every dead delivery")
    p = add("purge", cmd_purge, "remove studies whose newest instance is older than the "
                                "retention (files, index rows, drafts); never one with an open "
                                "job or an undelivered draft")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="default: [storage] retention_days")
    p.add_argument("--dry-run", action="store_true", help="only list what would go")
