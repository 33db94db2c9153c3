"""Slice-encoding benchmark: peak memory and speed against slice count (CPU).

For 50, 100, 200 and 800 slices of 512x512 CT (random HU), each in a fresh process, prints the
process peak RSS before encoding (model + input volume) and during encoding, the time, and
slices/s, for (a) the small config the demo model uses and (b) ViT-B/16 at 224x224 with a
12-layer 768-wide Z-former (random weights). Encoding runs under ``inference_mode`` in chunks of
``slice_batch`` slices, so the encoding overhead should stay flat as the slice count grows.

    .venv/bin/python bench/encode.py [--sizes 50 100 200 800] [--configs small vit-b]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "small": {},  # MSVLMConfig defaults: the size of the demo model
    "vit-b": dict(image_size=224, patch_size=16, vision_hidden=768, vision_layers=12,
                  vision_heads=12, vision_mlp=3072, z_hidden=768, z_layers=12, z_heads=12,
                  z_mlp=3072, slice_batch=32),
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name: str, slices: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from models.msvlm import MSVLMConfig
    from models.report import train_tokenizer
    from models.generator import build_tiny
    from models.view import View

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["Findings: none. Impression: none."], vocab_size=300)
    model = build_tiny(tokenizer, **CONFIGS[name]).eval()
    assert isinstance(model.config, MSVLMConfig)
    pixels = np.random.default_rng(0).standard_normal((slices, 512, 512), dtype=np.float32)
    pixels *= 400.0  # in place: no volume-sized temporaries before the measurement
    view = View(pixels, np.arange(slices) * 1.0, (0.7, 0.7), "CT", "axial")
    before = rss_mb()
    start = time.perf_counter()
    encoded = model.encode_slices(view)
    with torch.inference_mode():
        model.visual_tokens([[encoded]])
    seconds = time.perf_counter() - start
    return {"config": name, "slices": slices, "rss_before_mb": before, "peak_mb": rss_mb(),
            "seconds": seconds, "input_mb": pixels.nbytes / 2**20,
            "features_mb": encoded.embeddings.numel() * 4 / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 800])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "SLICES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    print(f"{'config':7s} {'slices':>6s} {'peak MB':>8s} {'model+input MB':>14s} "
          f"{'encode MB':>9s} {'seconds':>8s} {'slices/s':>9s}")
    for name in args.configs:
        rows = []
        for slices in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", name, str(slices)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            overhead = row["peak_mb"] - row["rss_before_mb"]
            print(f"{name:7s} {slices:6d} {row['peak_mb']:8.0f} {row['rss_before_mb']:14.0f} "
                  f"{overhead:9.0f} {row['seconds']:8.1f} {slices / row['seconds']:9.1f}",
                  flush=True)
        by = {r["slices"]: r for r in rows}
        if 100 in by and 800 in by:
            small, big = by[100], by[800]
            # the input volume is the caller's data (100 vs 800 MB here), so it is left out
            grown = big["peak_mb"] - big["input_mb"] - big["features_mb"]
            base = small["peak_mb"] - small["input_mb"]
            print(f"{name}: peak at 800 slices less its input volume and features = {grown:.0f} "
                  f"MB; 2x the peak at 100 slices less its input = {2 * base:.0f} MB -> "
                  f"{'OK' if grown <= 2 * base else 'ABOVE TARGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
