"""What one extract_features job pays before its first tile, and what a bundle of slides gains by
paying it once (docs/benchmarks.md, "Start-up per job and per bundle").

1. **Start-up breakdown** (``--startup``): in fresh processes, the time to each phase of a job --
   interpreter, ``import torch``, the rest of slidesnake's imports, building the backbone, loading
   its weights from a checkpoint file, moving it to the device and the first (warm-up) batch --
   against the per-tile cost of the steady state.
2. **Cohort against one large slide** (default): every job is what Snakemake runs for one slide --
   a fresh Python process executing ``scripts/extract_features.py`` (through ``runpy``, with the
   ``snakemake`` object a Snakemake script job gets) -- timed from spawn to exit. In one run, with
   each setting of ``features.shared_process``: ``--small`` slides of ``--small-tiles`` tiles each,
   one after the other as a bundle runs them, and one slide of ``--large-tiles`` tiles. The figure
   is tiles/s over the small slides divided by tiles/s on the large one. Slides are windows of one
   synthetic slide (scripts/bench/bench_features.py's all-tissue texture; reading costs what tissue
   costs), so every tile costs the same.

    .venv/bin/python scripts/bench/bench_bundle.py --startup
    .venv/bin/python scripts/bench/bench_bundle.py --small 8 --small-tiles 500 --large-tiles 4000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "scripts" / "bench"))

STARTUP_CHILD = r"""
import json, sys, time
t = {"start": time.perf_counter()}
import torch
t["import torch"] = time.perf_counter()
import slidesnake.features as F
from slidesnake.backbones import create_backbone
t["import slidesnake"] = time.perf_counter()
name, ckpt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
bb = create_backbone(name, weights="none")
t["build backbone (first: with torchvision's model code)"] = time.perf_counter()
bb = create_backbone(name, weights=ckpt)
t["build again + load weights from the checkpoint"] = time.perf_counter()
dev = F.resolve_device("cpu")
emb = F._Embedder(bb, dev, batch_size=32)
x = torch.randint(0, 255, (32, 224, 224, 3), dtype=torch.uint8)
emb(x)
t["device + first batch"] = time.perf_counter()
t0 = time.perf_counter()
for _ in range(n):
    emb(x)
per_tile = (time.perf_counter() - t0) / (32 * n)
keys = list(t)
phases = {k: t[k] - t[p] for p, k in zip(keys, keys[1:])}
print("RESULT " + json.dumps({"phases": phases, "per_tile": per_tile, "after_start": t[keys[-1]] - t["start"]}))
"""

JOB_CHILD = r"""
import runpy, sys, json
from types import SimpleNamespace
a = json.loads(sys.argv[1])
sm = SimpleNamespace(input=SimpleNamespace(**a["input"]), output=SimpleNamespace(**a["output"]),
                     params=SimpleNamespace(**a["params"]), log=[a["log"]], threads=a["threads"],
                     config=a["config"])
runpy.run_path(a["script"], init_globals={"snakemake": sm})
"""


def _wall_cpu(cmd, env=None):
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), proc.stdout


def startup(args) -> None:
    import torch

    from slidesnake.backbones import create_backbone

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{args.backbone}.pth"
        torch.save(create_backbone(args.backbone, weights="none").model.state_dict(), ckpt)
        interp = [_wall_cpu([sys.executable, "-c", "pass"])[0] for _ in range(args.repeats)]
        runs = []
        for _ in range(args.repeats):
            wall, cpu, out = _wall_cpu([sys.executable, "-c", STARTUP_CHILD, args.backbone, str(ckpt), "4",
                                        str(args.threads)],
                                       env={**os.environ, "PYTHONPATH": str(REPO / "scripts")})
            runs.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]))
        size = ckpt.stat().st_size / 2**20
    med = {k: statistics.median(r["phases"][k] for r in runs) for k in runs[0]["phases"]}
    per_tile = statistics.median(r["per_tile"] for r in runs)
    # a job builds its backbone once: the second build (+ weights) stands for loading a checkpoint
    total = statistics.median(interp) + sum(v for k, v in med.items() if not k.startswith("build again"))
    print(f"\n{args.backbone}, {args.threads} torch threads, checkpoint {size:.0f} MiB; median of "
          f"{args.repeats} fresh processes\n")
    print("| phase | seconds |\n|---|---:|")
    print(f"| interpreter start (python -c pass) | {statistics.median(interp):.2f} |")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    print(f"| **start-up in all** (without the second build) | **{total:.2f}** |")
    print(f"| per tile, steady state (batch 32) | {per_tile * 1000:.1f} ms ({1 / per_tile:.0f} tiles/s) |")
    print(f"\nstart-up = {total / per_tile:.0f} tiles' worth of backbone time")


def cohort(args) -> None:
    from bench_features import bench_tiles, ensure_slide
    from slidesnake.slide import open_slide, resolve_resolution

    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    slide = ensure_slide(out, args.size)
    need = args.small * args.small_tiles + args.large_tiles
    all_tiles = bench_tiles(slide, 224, min(need, args.large_tiles if args.reuse_windows else need))
    s = open_slide(slide, "bench")
    res = resolve_resolution(s.properties, "bench", slide)
    meta = {"path": str(slide), "mpp": res.mpp, "objective_power": 20.0, "tile_size": 224, "overlap": 0,
            "limit_bounds": True}

    def window(lo, n):
        t = all_tiles.iloc[lo:lo + n].copy()
        t["tile_id"] = range(len(t))
        return t

    jobs = []
    for i in range(args.small):
        lo = (i * args.small_tiles) % max(1, len(all_tiles) - args.small_tiles + 1)
        jobs.append((f"small{i:02d}", window(lo, args.small_tiles)))
    large = ("large", window(0, args.large_tiles))
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
    env.pop("SLURM_JOB_ID", None)
    results = {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        env["SLIDESNAKE_FEATSERVER_DIR"] = str(tmp / "sock")
        env["SLIDESNAKE_FEATSERVER_IDLE_S"] = "60"  # the server exits a minute after the last job
        for mode in args.modes:
            shared = mode == "shared"
            order = jobs + [large]  # the bundle's first job starts the server (its cost is in the cohort)
            times = {}
            for name, tiles in order:
                d = tmp / mode / name
                d.mkdir(parents=True)
                tiles.to_parquet(d / "tiles.parquet")
                (d / "slide.json").write_text(json.dumps({**meta, "slide_id": name}))
                (d / "qc.json").write_text(json.dumps({"slide_id": name, "status": "ok"}))
                a = {"input": {"slide": str(slide), "tiles": str(d / "tiles.parquet"), "meta": str(d / "slide.json"),
                               "qc": str(d / "qc.json")},
                     "output": {"store": str(d / f"{name}.zarr")},
                     "params": {"backbone": args.backbone, "weights": "none", "batch_size": "auto",
                                "num_workers": "auto", "device": "cpu", "feature_dtype": "float16"},
                     "log": str(d / "log.txt"), "threads": args.threads,
                     "config": {"on_bad_slide": "fail", "features": {"shared_process": shared}},
                     "script": str(REPO / "scripts" / "extract_features.py")}
                wall, cpu, _ = _wall_cpu([sys.executable, "-c", JOB_CHILD, json.dumps(a)], env=env)
                times[name] = (wall, len(tiles))
                print(f"  {mode:8s} {name}: {len(tiles)} tiles in {wall:.1f} s ({len(tiles) / wall:.1f} tiles/s), "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            small_wall = sum(w for n, (w, _) in times.items() if n != "large")
            small_tiles = sum(k for n, (_, k) in times.items() if n != "large")
            results[mode] = (small_tiles / small_wall, times["large"][1] / times["large"][0], small_wall,
                             times["large"][0])
    print(f"\n{args.small} slides x {args.small_tiles} tiles against 1 slide x {args.large_tiles} tiles, "
          f"{args.backbone}, device cpu, {args.threads} threads per job; load {os.getloadavg()[0]:.1f}\n")
    print("| features.shared_process | cohort tiles/s (wall) | large slide tiles/s | **cohort / large** |"
          "\n|---|---:|---:|---:|")
    for mode, (c, l, cw, lw) in results.items():
        print(f"| {'true (one process per bundle)' if mode == 'shared' else 'false (one process per slide)'} "
              f"| {c:.1f} ({cw:.0f} s) | {l:.1f} ({lw:.0f} s) | **{c / l:.2f}** |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--startup", action="store_true", help="the start-up breakdown instead of the cohort figure")
    ap.add_argument("--backbone", default="resnet18_trunc")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", type=int, default=8)
    ap.add_argument("--small-tiles", type=int, default=500)
    ap.add_argument("--large-tiles", type=int, default=4000)
    ap.add_argument("--size", type=int, default=20000, help="side of the synthetic slide (px)")
    ap.add_argument("--reuse-windows", action="store_true",
                    help="small slides are windows of the large one's tiles (a smaller synthetic slide)")
    ap.add_argument("--modes", nargs="+", default=["separate", "shared"], choices=["separate", "shared"])
    ap.add_argument("--workdir", default=str(REPO / "results" / "bench"))
    args = ap.parse_args(argv)
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; Python "
          f"{platform.python_version()}, torch {torch.__version__}")
    startup(args) if args.startup else cohort(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
