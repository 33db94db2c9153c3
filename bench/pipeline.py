"""Pipeline benchmark: seconds from the last image to the draft SR stored at the destination.

Writes a 300-slice 512x512 CT phantom study (``--slices``, ``--matrix``), then twice starts
Orthanc as the destination PACS and ``msvlm-node serve`` with the demo checkpoint, pushes the
study with ``TCP_NODELAY=1 /usr/bin/storescu`` and reads the stage breakdown from the index:
completion (last image -> job queued), queue wait, collect, load (DICOM -> volumes), encode,
generate, SR build, store, send (job done -> Orthanc answered Success). Three runs: the quiet
period only (``--quiet-s``, default 60 = the default ``stable_age_s``) without streaming; the
association cue (``settle_s`` 2) without streaming; the association cue with streaming (slices
encoded while the study arrives). Prints them side by side with the targets (stable = job
queued).

    .venv/bin/python bench/pipeline.py [--slices 300] [--matrix 512] [--quiet-s 60]
                                       [--stream-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from ingest import ENV, MSVLM_NODE, ROOT, Orthanc, free_port, wait_port

sys.path.insert(0, str(ROOT))

LAST_IMAGE_TARGET_S = 10.0
STABLE_TARGET_S = 1.5


def build_study(dest: Path, slices: int, matrix: int) -> None:
    from models.phantom import generate_case
    from storage.volumes import StudyInfo, write_ct_series

    case = generate_case(7, phases=("non_contrast",), slices=slices, matrix=matrix,
                         force={"Lung nodule": True})
    view = case.views[0]
    write_ct_series(dest, view.pixels, view.z_mm, view.pixel_spacing_mm, view.plane, view.phase,
                    StudyInfo("1.2.826.0.1.3680043.10.1452.7007", "BENCH7"))


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def run_mode(args: argparse.Namespace, study: Path, completion: str, stable_age: float,
             label: str) -> dict[str, float]:
    """Start Orthanc and the node with ``[completion]`` as given, push the study, and return
    the stages (seconds) up to the SR stored at Orthanc."""
    run = args.work / f"run-{label}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    orthanc = Orthanc(run / "orthanc")
    (run / "orthanc").mkdir()
    orthanc.start()
    port = free_port()
    cfg = run / "node.toml"
    cfg.write_text(
        f'[node]\nae_title = "MSVLM"\nbind_address = "127.0.0.1"\nport = {port}\n'
        f'accept_unknown_peers = true\n[storage]\nroot = "{run / "store"}"\nmin_free_bytes = 0\n'
        f"[completion]\nstable_age_s = {stable_age}\n{completion}\n"
        f'[peers.pacs]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.port}\n'
        f'[report]\nsend_to = ["pacs"]\n[model]\ncheckpoint = "demo"\ndevice = "cpu"\n'
        f"[delivery]\nretry_delay_s = 1\n")
    log = open(run / "serve.log", "wb")
    node = subprocess.Popen([MSVLM_NODE, "serve", "-c", str(cfg)], env=ENV, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        while b"ready" not in (run / "serve.log").read_bytes():
            time.sleep(0.2)
        push = time.perf_counter()
        subprocess.run(["/usr/bin/storescu", "-aec", "MSVLM", "+sd", "127.0.0.1", str(port),
                        str(study)], env=ENV, check=True)
        print(f"[{label}] pushed {args.slices} instances in {time.perf_counter() - push:.1f} s",
              flush=True)
        db = run / "store" / "index.sqlite"
        row = None
        deadline = time.monotonic() + stable_age + 600
        while row is None and time.monotonic() < deadline:
            time.sleep(0.2)
            with sqlite3.connect(db, timeout=30) as con:
                row = con.execute(
                    "select s.last_image_at, j.created_at, j.started_at, j.finished_at, "
                    "j.timings, d.sent_at, j.state, j.error from study s join job j on "
                    "j.study_id = s.id left join delivery d on d.job_id = j.id where "
                    "d.state = 'sent' or j.state = 'failed'").fetchone()
        if row is None:
            raise RuntimeError("no SR delivered in time")
        last_image, created, started, finished, timings, sent, state, error = row
        if state != "done":
            raise RuntimeError(f"job failed: {error}")
        stages = {"complete (last image -> queued)":
                  (when(created) - when(last_image)).total_seconds(),
                  "queue wait": (when(started) - when(created)).total_seconds()}
        times = json.loads(timings)
        stages.update({k.removesuffix("_s"): v for k, v in times.items() if k.endswith("_s")})
        stages["slices streamed (count)"] = times.get("streamed_slices", 0.0)
        stages["send (to Orthanc's Success)"] = (when(sent) - when(finished)).total_seconds()
        stages["queued -> SR at Orthanc"] = (when(sent) - when(created)).total_seconds()
        stages["last image -> SR at Orthanc"] = (when(sent) - when(last_image)).total_seconds()
        with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http}/series?expand") as r:
            srs = [s for s in json.load(r) if s["MainDicomTags"].get("Modality") == "SR"]
        if not srs:
            raise RuntimeError("no SR series at Orthanc")
        return stages
    finally:
        node.terminate()
        node.wait(timeout=60)
        log.close()
        orthanc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--quiet-s", type=float, default=60.0,
                        help="the quiet period of the first run (the default stable_age_s)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/msvlm-pipe"))
    parser.add_argument("--stream-only", action="store_true",
                        help="only the association cue + streaming run (no before/after table)")
    args = parser.parse_args()
    study = args.work / f"study-{args.slices}x{args.matrix}"
    if not study.exists():
        print(f"writing a {args.slices}-slice {args.matrix}x{args.matrix} phantom study ...",
              flush=True)
        build_study(study, args.slices, args.matrix)
    off, on = "[worker]\nstream = false\n", "[worker]\nstream = true\n"
    if args.stream_only:
        stages = run_mode(args, study, "association_cue = true\nsettle_s = 2\n" + on, 600.0,
                          "stream")
        for name, value in stages.items():
            print(f"  {name:34s}{value:10.2f}")
        return 0 if stages["queued -> SR at Orthanc"] <= STABLE_TARGET_S else 1
    modes = {
        f"quiet {args.quiet_s:.0f} s, no streaming":
            run_mode(args, study, "association_cue = false\nexpected_count_cue = false\n" + off,
                     args.quiet_s, "quiet"),
        "assoc. cue, no streaming":
            run_mode(args, study, "association_cue = true\nsettle_s = 2\n" + off, 600.0, "cue"),
        "assoc. cue + streaming":
            run_mode(args, study, "association_cue = true\nsettle_s = 2\n" + on, 600.0,
                     "stream"),
    }
    names = list(next(iter(modes.values())))
    print(f"\n{args.slices} slices {args.matrix}x{args.matrix}, demo checkpoint, CPU; seconds")
    print(f"  {'stage':34s}" + "".join(f"{m:>28s}" for m in modes))
    for name in names:
        print(f"  {name:34s}" + "".join(f"{stages.get(name, 0.0):28.2f}"
                                         for stages in modes.values()))
    cue = modes["assoc. cue, no streaming"]
    streamed = modes["assoc. cue + streaming"]
    last = streamed["last image -> SR at Orthanc"]
    stable = streamed["queued -> SR at Orthanc"]
    ok_last, ok_stable = last <= LAST_IMAGE_TARGET_S, stable <= STABLE_TARGET_S
    print(f"  last image -> SR, association cue + streaming: {last:.2f} s (no streaming "
          f"{cue['last image -> SR at Orthanc']:.2f} s; target <= {LAST_IMAGE_TARGET_S:.0f} s:"
          f" {'met' if ok_last else 'MISSED'})")
    print(f"  stable -> SR with streaming: {stable:.2f} s (no streaming "
          f"{cue['queued -> SR at Orthanc']:.2f} s; target <= {STABLE_TARGET_S} s: "
          f"{'met' if ok_stable else 'MISSED'})")
    return 0 if ok_last and ok_stable else 1


if __name__ == "__main__":
    sys.exit(main())
