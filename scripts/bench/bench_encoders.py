"""Tiles per second of every foundation-model preset (slidesnake.presets) at full size.

Each preset is built at its real size with random weights (the published weights are not needed
to measure speed: the compute is the same), then uint8 tiles at the preset's input size go through
the extractor's device path (slidesnake.features._Embedder: normalisation, channels-last, the
backbone; bf16 autocast on CUDA, float32 on CPU). One warm-up batch, then ``--batches`` timed
batches. Prints a Markdown table (and JSON with --json) with the parameter count.

    .venv/bin/python scripts/bench/bench_encoders.py                   # every preset, CPU or CUDA
    .venv/bin/python scripts/bench/bench_encoders.py --presets uni ctranspath --batch-size 8
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # scripts/: the package

from slidesnake.backbones import create_backbone  # noqa: E402
from slidesnake.features import _Embedder, resolve_device  # noqa: E402
from slidesnake.presets import PRESETS  # noqa: E402


def bench(name: str, device: torch.device, batch_size: int, batches: int) -> dict:
    t0 = time.perf_counter()
    bb = create_backbone(name, weights="none")
    build = time.perf_counter() - t0
    params = sum(p.numel() for p in bb.model.parameters())
    embed = _Embedder(bb, device)
    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (batch_size, bb.input_size, bb.input_size, 3), dtype=torch.uint8, generator=g)
    out = embed(tiles[: max(1, batch_size // 2)])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        out = embed(tiles)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {"preset": name, "params_M": round(params / 1e6, 1), "input": bb.input_size, "dim": int(out.shape[1]),
           "tiles_per_s": round(batch_size * batches / seconds, 2), "batch_size": batch_size,
           "batches": batches, "build_s": round(build, 1), "precision": embed.precision}
    del bb, embed
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 64 on CUDA")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all CPUs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or (64 if device.type == "cuda" else 4)
    import timm

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), timm {timm.__version__}, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", flush=True)
    rows = []
    print("| preset | params | input | dim | tiles/s | batch x batches | build s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for name in args.presets:
        r = bench(name, device, batch, args.batches)
        rows.append(r)
        print(f"| {r['preset']} | {r['params_M']}M | {r['input']} | {r['dim']} | {r['tiles_per_s']} | "
              f"{r['batch_size']} x {r['batches']} | {r['build_s']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
