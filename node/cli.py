"""``msvlm-node``: the command line (the only place that configures logging)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from node import __version__
from node.config import Config, ConfigError, load_config

logger = logging.getLogger("node")


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import Node

    Node(load_config(args.config)).serve()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    print(load_config(args.config).to_toml(), end="")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from node.scu import echo, resolve_target

    config = load_config(args.config)
    target = resolve_target(config, args.target, args.called_ae_title)
    status, seconds = echo(config, target)
    where = f"{target.ae_title}@{target.host}:{target.port}"
    if status is None:
        print(f"Echo to {where}: association rejected, aborted or no answer "
              f"({seconds * 1000:.0f} ms)")
        return 2
    print(f"Echo to {where}: status 0x{status:04X}{' (Success)' if status == 0 else ''} "
          f"in {seconds * 1000:.0f} ms")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from node.scu import resolve_target, send

    config = load_config(args.config)
    target = resolve_target(config, args.to, args.called_ae_title)
    summary = send(config, target, args.paths)
    for path, reason in summary.failures:
        print(f"FAILED {path}: {reason}")
    counts = ", ".join(f"{label}: {n}" for label, n in sorted(summary.statuses.items()))
    total = sum(summary.statuses.values())
    print(f"Sent {total} file(s) to {target.ae_title}@{target.host}:{target.port} - "
          f"{counts or 'nothing to send'}")
    return 0 if summary.ok and total else 1


def _open_index(config: Config):  # type: ignore[no-untyped-def]
    from storage.index import Index

    return Index(config.storage.effective_database_url, config.file_store())


def cmd_studies(args: argparse.Namespace) -> int:
    index = _open_index(load_config(args.config))
    rows = index.studies()
    print(f"{'STUDY INSTANCE UID':<64}  {'MOD':<6} {'SER':>3} {'INST':>6}  {'PLANES':<18} "
          f"{'PHASES':<26} {'LAST RECEIVED (UTC)':<19}  STATE")
    for s in rows:
        print(f"{s.study_instance_uid:<64}  {','.join(s.modalities):<6} {s.series_count:>3} "
              f"{s.instance_count:>6}  {','.join(s.planes):<18} {','.join(s.phases):<26} "
              f"{s.last_received_at:%Y-%m-%d %H:%M:%S}  {s.state}")
    print(f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'}")
    return 0


def cmd_series(args: argparse.Namespace) -> int:
    index = _open_index(load_config(args.config))
    rows = index.series(args.study_instance_uid)
    if not rows:
        print(f"No study {args.study_instance_uid!r} in the index")
        return 1
    print(f"{'SERIES INSTANCE UID':<64}  {'#':>4} {'MOD':<4} {'INST':>5}  {'PLANE':<9} "
          f"{'PHASE':<14} {'BODY PART':<10} LOC  DESCRIPTION")
    for s in rows:
        print(f"{s.series_instance_uid:<64}  {s.series_number or '':>4} {s.modality or '?':<4} "
              f"{s.instance_count:>5}  {s.plane:<9} {s.phase:<14} {s.body_part or '':<10} "
              f"{'yes' if s.is_localizer else 'no ':<4} {s.series_description or ''}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from node.metrics import status_text

    config = load_config(args.config)
    text, ready = status_text(config, _open_index(config))
    print(text)
    return 0 if ready else 3


def cmd_reindex(args: argparse.Namespace) -> int:
    index = _open_index(load_config(args.config))
    indexed, removed = index.rebuild()
    print(f"Reindexed {indexed} file(s); removed {removed} row(s) whose file is gone")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msvlm-node", description=(
        "DICOM node that receives CT/MR studies and returns MS-VLM draft reports."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, default=None, help=(
        "configuration file (default: $MSVLM_NODE_CONFIG, then /etc/msvlm-node/config.toml)"))
    common.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the node (SCP, indexer, completion, workers, delivery) until "
                            "SIGTERM")
    add("check-config", cmd_check_config, "print the effective configuration or its errors")
    p = add("echo", cmd_echo, "C-ECHO a peer (name from [peers]) or HOST:PORT")
    p.add_argument("target")
    p.add_argument("--called-ae-title", default=None, help="default: the peer's, or ANY-SCP")
    p = add("send", cmd_send, "C-STORE files or folders to a peer or HOST:PORT")
    p.add_argument("paths", nargs="+")
    p.add_argument("--to", required=True, help="peer name from [peers] or HOST:PORT")
    p.add_argument("--called-ae-title", default=None, help="default: the peer's, or ANY-SCP")
    add("studies", cmd_studies, "list the studies in the index")
    p = add("series", cmd_series, "list the series of one study")
    p.add_argument("study_instance_uid")
    add("reindex", cmd_reindex, "rebuild the index from the stored files")
    add("status", cmd_status, "the node at a glance: identity, model, peers, counts, queue, "
                              "last errors, readiness (exit 3 when not ready)")
    from node.research import add_commands, add_train_command

    add_commands(sub, common)
    add_train_command(sub, common)
    from node.offline import add_report_command

    add_report_command(sub, common)
    from node.ops import add_pipeline_commands

    add_pipeline_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] in (["serve"], ["worker"]):
        # stopped before the service installs its own handlers (building the parser alone
        # imports torch): a clean stop, nothing was started yet; os._exit, not an exception
        # unwinding through a half-done import (see node.worker.stop_on_signals)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before there is anything to reload
    args = build_parser().parse_args(given)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # a completion scan still running when the next is due is skipped on purpose (coalesced)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"msvlm-node: configuration error: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG
    except ValueError as exc:
        print(f"msvlm-node: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"msvlm-node: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
