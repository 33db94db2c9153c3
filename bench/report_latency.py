"""Seconds from a stable 300-slice CT study to a draft report on this CPU (encode + generate).

    .venv/bin/python bench/report_latency.py [--checkpoint demo] [--slices 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from models.generator import ReportGenerator
    from models.phantom import generate_case
    from node.research import resolve_checkpoint

    start = time.perf_counter()
    generator = ReportGenerator.from_pretrained(resolve_checkpoint(args.checkpoint), "cpu")
    load_s = time.perf_counter() - start
    case = generate_case(2024, phases=("non_contrast",), slices=args.slices)
    rows = []
    for _ in range(args.repeat):
        report = generator.generate(case.views)
        rows.append(report.timings)
    encode = statistics.median(r["encode_s"] for r in rows)
    generate = statistics.median(r["generate_s"] for r in rows)
    print(f"checkpoint {args.checkpoint} ({generator.version}), {args.slices} slices of "
          f"{case.views[0].pixels.shape[1]}x{case.views[0].pixels.shape[2]}, "
          f"{torch.get_num_threads()} threads")
    print(f"load {load_s:.2f} s (once per worker) | encode {encode:.2f} s | generate "
          f"{generate:.2f} s | encode + generate {encode + generate:.2f} s (median of "
          f"{args.repeat})")
    print(f"report: {report.findings[:200]} ... | {report.impression[:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
