"""Benchmark of feature extraction: slidesnake against the backbone alone and a naive baseline.

    python scripts/bench/bench_features.py [--size 60000] [--backbone resnet50_trunc] [--tiles N]
        [--batch-size auto] [--workers auto] [--compile] [--repeats 1] [--device auto]

(``make bench-features``). Builds a synthetic pyramidal JPEG slide of ``size`` x ``size`` pixels at
20x once (cached under ``--out``, default results/bench/), then, in one run and on one device
(CUDA when present, else CPU), measures on the same N tiles of that slide:

(a) ceiling: the backbone alone on random input already on the device (same batch size,
    precision, layout and compile setting as (b)), steady state after one warm-up batch;
(b) slidesnake: ``slidesnake.features.extract_slide`` end to end (the whole call: backbone set-up,
    worker start, reading, decoding, resizing, embedding, writing the Zarr store);
(c) naive: the common way -- fp32, one ``slide.read_region`` per tile in a ``Dataset``, PIL +
    torchvision ``Resize`` / ``ToTensor`` / ``Normalize`` on the host, a DataLoader with default
    settings (no workers, no pinning) but the same batch size, features kept in memory.

Each measurement runs in a fresh process, so peak memory is its own: the peak over the run of
the summed RSS (and PSS, which counts pages shared with forked workers once) of the process and
its workers, and on CUDA ``torch.cuda.max_memory_allocated``. Throughput is tiles per wall-clock
second, and tiles per CPU-second (user + system of the process and its workers) as a figure that
other load on the machine disturbs less. With ``--repeats R`` the methods run in rounds
a, b, c, a, b, c, ...; figures are medians and every ratio is taken between measurements of this
run. Writes a markdown table (printed, and ``features_<backbone>_<device>.md``) and a JSON file
beside the slide.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MAGNIFICATION = 20.0
ATLAS = 4096  # period of the texture tiled over the synthetic slide (level-0 pixels)


# ---------------------------------------------------------------------------------------------
# synthetic slide


class AtlasRender:
    """``render(x, y, w, h, downsample)`` for :func:`slidesnake.demo.write_slide`: an H&E-like
    tissue texture (:class:`slidesnake.demo.HEScene`, all tissue) of ``ATLAS`` pixels, repeated.
    Rendering the scene itself over 60k x 60k pixels would take an hour; tiling it costs seconds
    and gives JPEG tiles of the same content (so the same decoding cost) as real tissue."""

    def __init__(self, seed: int = 0):
        import cv2

        from slidesnake.demo import HEScene

        scene = HEScene(2 * ATLAS, 2 * ATLAS, seed=seed, tissue_fraction=0.9, n_regions=3)
        base = scene.render(ATLAS // 2, ATLAS // 2, ATLAS, ATLAS)
        self.levels = {1: base}
        for ds in (4, 16, 64):
            self.levels[ds] = cv2.resize(base, (ATLAS // ds, ATLAS // ds), interpolation=cv2.INTER_AREA)

    def __call__(self, x: float, y: float, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        d = max(k for k in self.levels if k <= max(1.0, downsample))
        img = self.levels[d]
        period, step = img.shape[0], downsample / d
        xs = np.floor(x / d + (np.arange(w) + 0.5) * step).astype(np.int64) % period
        ys = np.floor(y / d + (np.arange(h) + 0.5) * step).astype(np.int64) % period
        return img[np.ix_(ys, xs)]


def ensure_slide(out: Path, size: int) -> Path:
    """The cached synthetic slide of ``size`` x ``size`` px at 20x, 0.5 um/px (built once)."""
    from slidesnake.demo import write_slide

    path = out / f"synthetic_{size}.svs"
    if path.exists():
        return path
    print(f"building {path} ({size} x {size} px, JPEG tiles; once) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    write_slide(path, size, size, AtlasRender(), mpp=0.5, objective=20,
                workers=max(1, len(os.sched_getaffinity(0))))
    print(f"built in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / 2**20:.0f} MiB)",
          file=sys.stderr, flush=True)
    return path


def bench_tiles(slide_path: Path, tile_size: int, n: int):
    """``n`` consecutive 20x grid tiles (row-major, from a third of the way down the slide), as
    the tiles table extract_slide reads (all kept)."""
    from slidesnake.slide import open_slide, resolve_resolution
    from slidesnake.tiling import build_grid

    slide = open_slide(slide_path, "bench")
    res = resolve_resolution(slide.properties, "bench", slide_path)
    grid, _ = build_grid(slide, res, [MAGNIFICATION], tile_size, limit_bounds=True)
    if n > len(grid):
        raise SystemExit(f"--tiles {n}: the slide has {len(grid)} tiles at {tile_size} px; raise --size")
    start = min(len(grid) - n, int(grid["row"].max()) // 3 * int(grid["col"].max() + 1))
    tiles = grid.iloc[start:start + n].copy()
    tiles["keep"] = True
    tiles["tile_id"] = np.arange(len(tiles), dtype=np.int64)
    return tiles.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# one measurement (runs in its own process)


class PeakMemory:
    """Samples the summed RSS / PSS of this process and its children every ``interval`` s (psutil;
    without it no memory is reported)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.rss, self.pss = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        rss = pss = 0
        for p in [me] + me.children(recursive=True):
            try:
                info = p.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ceiling(spec: dict, device) -> int:
    """(a) the backbone alone on random, already normalised input on the device."""
    import torch

    from slidesnake.backbones import create_backbone
    from slidesnake.features import _Embedder

    bb = create_backbone(spec["backbone"])
    b = spec["batch_size"]
    embed = _Embedder(bb, device, compile=spec["compile"], batch_size=b)
    x = torch.randn(b, 3, bb.input_size, bb.input_size, device=device)
    x = x.contiguous(memory_format=embed.memory_format)
    embed.run(x).result()  # warm-up (and compilation)
    _sync(device)
    spec["_t0"], spec["_c0"] = time.perf_counter(), _cpu_seconds()
    n = math.ceil(spec["tiles"] / b)
    pending = None
    for _ in range(n):
        nxt = embed.run(x)
        if pending is not None:
            pending.result()
        pending = nxt
    pending.result()
    _sync(device)
    return n * b


def run_slidesnake(spec: dict, device) -> int:
    """(b) extract_slide end to end, into a store that is removed afterwards.

    On CPU the backbone call of every batch is synchronous, so timing it inside this very run
    gives (a'): the backbone alone, measured batch by batch interleaved with everything else
    (b) does -- a ceiling that the machine's other load affects exactly as it affects (b).
    """
    import shutil

    import pandas as pd

    from slidesnake import features
    from slidesnake.features import extract_slide

    busy = {"seconds": 0.0, "tiles": 0}
    if device.type == "cpu":
        run = features._Embedder.run

        def timed(self, x):
            t = time.perf_counter()
            out = run(self, x)
            busy["seconds"] += time.perf_counter() - t
            busy["tiles"] += len(x)
            return out

        features._Embedder.run = timed
    spec["_busy"] = busy
    tiles = pd.read_parquet(spec["tiles_table"])
    out = Path(spec["workdir"]) / f"store-{os.getpid()}.zarr"
    spec["_t0"], spec["_c0"] = time.perf_counter(), _cpu_seconds()
    summary = extract_slide(spec["slide"], tiles, out, slide_id="bench", backbone=spec["backbone"],
                            tile_size=spec["tile_size"], batch_size=spec["batch_size"],
                            num_workers=spec["workers"], device=str(device), compile=spec["compile"])
    _sync(device)
    spec["_summary"] = summary
    spec["_t_end"], spec["_c_end"] = time.perf_counter(), _cpu_seconds()
    shutil.rmtree(out, ignore_errors=True)
    return summary["n_tiles"]


def run_naive(spec: dict, device) -> int:
    """(c) the common way: read_region per tile, host-side torchvision transforms, fp32."""
    import openslide
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from slidesnake.backbones import create_backbone

    tiles = pd.read_parquet(spec["tiles_table"])
    spec["_t0"], spec["_c0"] = time.perf_counter(), _cpu_seconds()
    bb = create_backbone(spec["backbone"])

    class Tiles(Dataset):
        def __init__(self, path, boxes, transform):
            self.slide = openslide.OpenSlide(path)
            self.boxes, self.transform = boxes, transform

        def __len__(self):
            return len(self.boxes)

        def __getitem__(self, i):
            x, y, w, h = (int(v) for v in self.boxes[i])
            return self.transform(self.slide.read_region((x, y), 0, (w, h)).convert("RGB"))

    transform = transforms.Compose([transforms.Resize(bb.input_size), transforms.ToTensor(),
                                    transforms.Normalize(bb.mean, bb.std)])
    loader = DataLoader(Tiles(spec["slide"], tiles[["x", "y", "w", "h"]].to_numpy(), transform),
                        batch_size=spec["batch_size"])
    model = bb.model.to(device).eval()
    feats = []
    with torch.inference_mode():
        for batch in loader:
            feats.append(model(batch.to(device)).cpu().numpy())
    return len(np.concatenate(feats))


def child(spec_path: str) -> None:
    import torch

    from slidesnake.features import resolve_device

    spec = json.loads(Path(spec_path).read_text())
    device = resolve_device(spec["device"])
    # Imports are the process's start-up, not extraction: done before any clock starts.
    import openslide  # noqa: F401
    import pandas  # noqa: F401
    import torchvision.models  # noqa: F401
    import torchvision.transforms  # noqa: F401

    import slidesnake.features  # noqa: F401
    if spec["backbone"].startswith("timm:"):
        import timm  # noqa: F401
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    load = os.getloadavg()[0]
    with PeakMemory() as mem:
        n = {"a": run_ceiling, "b": run_slidesnake, "c": run_naive}[spec["method"]](spec, device)
        t_end, c_end = spec.get("_t_end", time.perf_counter()), spec.get("_c_end", _cpu_seconds())
    seconds, cpu = t_end - spec["_t0"], c_end - spec["_c0"]
    result = {"method": spec["method"], "tiles": n, "seconds": seconds, "cpu_seconds": cpu,
              "tiles_per_s": n / seconds, "tiles_per_cpu_s": n / cpu if cpu > 0 else None,
              "peak_rss_mib": mem.rss / 2**20, "peak_pss_mib": mem.pss / 2**20 if mem.pss else None,
              "cuda_max_allocated_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                                         if device.type == "cuda" else None),
              "load_before": load, "load_after": os.getloadavg()[0]}
    if "_summary" in spec:
        result["extract_slide"] = spec["_summary"]
    busy = spec.get("_busy") or {}
    if busy.get("seconds"):
        result["inside_ceiling_tiles_per_s"] = busy["tiles"] / busy["seconds"]
        result["busy_fraction"] = busy["seconds"] / seconds
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# driver


METHODS = {"a": "(a) backbone alone (ceiling)", "b": "(b) slidesnake extract_slide",
           "c": "(c) naive baseline"}


def environment(device) -> dict:
    import openslide
    import torch
    import torchvision
    import zarr

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "zarr": zarr.__version__,
           "openslide": openslide.__library_version__, "openslide_python": openslide.__version__,
           "cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
           "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
           "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=60000, help="side of the synthetic slide in pixels")
    ap.add_argument("--backbone", default="resnet50_trunc")
    ap.add_argument("--tiles", type=int, default=None,
                    help="tiles per measurement (default: 16 batches on CPU, 10240 on CUDA)")
    ap.add_argument("--batch-size", default="auto", help="tiles per batch (auto: from the device)")
    ap.add_argument("--workers", default="auto", help="slidesnake's reading workers (auto: from the CPUs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone in (a) and (b)")
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of (a), (b), (c)")
    ap.add_argument("--methods", default="abc", help="subset of abc to run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0

    from slidesnake.backbones import create_backbone
    from slidesnake.features import resolve_batch_size, resolve_device

    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    input_size = create_backbone(args.backbone).input_size
    batch = resolve_batch_size(args.batch_size if args.batch_size == "auto" else int(args.batch_size),
                               device, input_size)
    n = args.tiles or (10240 if device.type == "cuda" else 16 * batch)
    slide = ensure_slide(args.out, args.size)
    tiles = bench_tiles(slide, args.tile_size, n)
    table = args.out / f"tiles_{args.size}_{args.tile_size}_{n}.parquet"
    tiles.to_parquet(table)

    workers = args.workers if args.workers == "auto" else int(args.workers)
    base = {"backbone": args.backbone, "batch_size": batch, "workers": workers, "compile": args.compile,
            "tiles": n, "tile_size": args.tile_size, "slide": str(slide), "tiles_table": str(table),
            "device": str(device), "workdir": str(args.out)}
    env = environment(device)
    print(f"{args.backbone} on {env['device']} ({env.get('gpu', env['cpu'])}), {n} tiles of "
          f"{args.tile_size} px, batch {batch}, workers {workers}, compile {args.compile}, "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for r in range(args.repeats):
        # a, b, c then c, b, a, ...: (b) always runs next to (a) and (c), and slow drifts of the
        # machine's load cancel out between rounds.
        for m in (args.methods if r % 2 == 0 else args.methods[::-1]):
            spec = {**base, "method": m, "result": str(args.out / f".result-{os.getpid()}.json")}
            spec_path = args.out / f".spec-{os.getpid()}.json"
            spec_path.write_text(json.dumps(spec))
            subprocess.run([sys.executable, __file__, "--child", str(spec_path)], check=True,
                           stdout=subprocess.DEVNULL if m != "b" else None)
            res = json.loads(Path(spec["result"]).read_text())
            Path(spec["result"]).unlink()
            spec_path.unlink()
            runs[m].append(res)
            print(f"round {r + 1}/{args.repeats} {METHODS[m]}: {res['tiles_per_s']:.1f} tiles/s, "
                  f"{res['tiles_per_cpu_s']:.2f} tiles/CPU-s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                  f"load {res['load_before']:.2f}", file=sys.stderr, flush=True)
    report = summarise(runs, base, env, args)
    stem = args.out / f"features_{args.backbone.replace(':', '_')}_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.md and {stem}.json", file=sys.stderr)
    return 0


def _median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(runs: dict, base: dict, env: dict, args) -> dict:
    methods = {m: {"runs": rs, **{k: _median(rs, k) for k in (
        "tiles_per_s", "tiles_per_cpu_s", "peak_rss_mib", "peak_pss_mib", "cuda_max_allocated_mib")}}
        for m, rs in runs.items()}
    ratios = {}
    for num, den in (("b", "a"), ("b", "c")):
        if num in runs and den in runs:
            per_round = [x["tiles_per_s"] / y["tiles_per_s"] for x, y in zip(runs[num], runs[den])]
            per_round_cpu = [x["tiles_per_cpu_s"] / y["tiles_per_cpu_s"] for x, y in zip(runs[num], runs[den])]
            ratios[f"{num}/{den}"] = {
                "median_of_rounds": statistics.median(per_round),
                "tiles_per_s": methods[num]["tiles_per_s"] / methods[den]["tiles_per_s"],
                "per_round": per_round,
                "tiles_per_cpu_s": methods[num]["tiles_per_cpu_s"] / methods[den]["tiles_per_cpu_s"],
                "per_round_cpu": per_round_cpu}
    if "b" in runs and all(r.get("busy_fraction") for r in runs["b"]):
        fractions = [r["busy_fraction"] for r in runs["b"]]
        ratios["b/a'"] = {"median_of_rounds": statistics.median(fractions), "per_round": fractions,
                          "inside_ceiling_tiles_per_s": _median(runs["b"], "inside_ceiling_tiles_per_s")}
    loads = [r[k] for rs in runs.values() for r in rs for k in ("load_before", "load_after")]
    return {"settings": {**{k: v for k, v in base.items() if k not in ("tiles_table", "workdir")},
                         "size": args.size, "repeats": args.repeats},
            "environment": env, "load_average_1min": {"min": min(loads), "max": max(loads)},
            "methods": methods, "ratios": ratios,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def markdown(rep: dict) -> str:
    s, env, m = rep["settings"], rep["environment"], rep["methods"]
    b = m.get("b", {}).get("runs", [{}])[0].get("extract_slide", {})
    lines = [
        f"### {s['backbone']} on {env.get('gpu', env['cpu'])} ({env['device']})",
        "",
        f"{s['tiles']} tiles of {s['tile_size']} px at 20x from a {s['size']} x {s['size']} px synthetic "
        f"JPEG slide; batch {s['batch_size']}, slidesnake workers {b.get('num_workers', s['workers'])}, "
        f"precision {b.get('precision', '?')}, compile {s['compile']}; {s['repeats']} round(s), medians. "
        f"{env['cpus']} CPUs, {env['torch_threads']} torch threads, 1-min load average "
        f"{rep['load_average_1min']['min']:.2f}-{rep['load_average_1min']['max']:.2f}. "
        f"torch {env['torch']}, torchvision {env['torchvision']}, OpenSlide {env['openslide']}, "
        f"zarr {env['zarr']}, Python {env['python']}. {rep['date']}.",
        "",
        "| method | tiles/s | tiles/CPU-s | vs (a) | peak RSS, MiB | peak PSS, MiB | CUDA max alloc., MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    for key, label in METHODS.items():
        if key not in m:
            continue
        r = m[key]
        vs = r["tiles_per_s"] / m["a"]["tiles_per_s"] if "a" in m else None
        lines.append(f"| {label} | {fmt(r['tiles_per_s'])} | {fmt(r['tiles_per_cpu_s'], '.2f')} | "
                     f"{fmt(vs and 100 * vs, '.0f')}{'%' if vs else ''} | {fmt(r['peak_rss_mib'], '.0f')} | "
                     f"{fmt(r['peak_pss_mib'], '.0f')} | {fmt(r['cuda_max_allocated_mib'], '.0f')} |")
    lines.append("")
    for name, r in rep["ratios"].items():
        rounds = ", ".join(f"{x:.2f}" for x in r["per_round"])
        if name == "b/a'":
            lines.append(f"- b/a': **{r['median_of_rounds']:.2f}**, median over rounds ({rounds}) of the share "
                         f"of (b)'s wall time spent in the backbone, i.e. (b) against (a') = the backbone "
                         f"alone timed batch by batch inside (b)'s own run "
                         f"({r['inside_ceiling_tiles_per_s']:.1f} tiles/s, median); immune to the "
                         f"machine's other load, which slows both alike")
            continue
        lines.append(f"- {name}: **{r['median_of_rounds']:.2f}** in tiles/s, median over rounds of the "
                     f"ratio within each round ({rounds}); ratio of the medians {r['tiles_per_s']:.2f}; "
                     f"{r['tiles_per_cpu_s']:.2f} in tiles per CPU-second")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
