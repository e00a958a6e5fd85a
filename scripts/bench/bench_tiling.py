"""Benchmark: tiling and tissue filtering of a generated 100,000 x 100,000 px slide at 20x.

    python scripts/bench/bench_tiling.py --workdir /tmp/slidesnake-bench [--size 100000] [--cores 2]

1. Writes (once; reused when present) a pyramidal Aperio-layout JPEG TIFF of ``size`` x ``size``
   pixels at 0.5 um/px (20x) with :func:`slidesnake.demo.write_slide`. The render function is cheap
   on purpose: smooth tissue blobs from a coarse noise map, filled with a few real-looking H&E
   patches from :class:`slidesnake.demo.HEScene`, glass elsewhere, and a few pen strokes.
2. Runs the workflow's ``tile`` and ``filter_tissue`` rules on it (Snakemake, ``--cores`` cores,
   target ``results/qc/BIG/qc.json``) under ``/usr/bin/time -v``, while sampling the proportional
   set size (PSS, so pages shared by forked workers count once) of the whole process tree.
3. Prints a Markdown table: wall time per rule, tiles, tiles read, tiles/s per core, peak memory
   (/usr/bin/time's maximum RSS of one process, Snakemake's per-job max_rss and the sampled
   tree PSS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from slidesnake.demo import HEScene, write_slide

REPO = Path(__file__).resolve().parents[2]
GLASS = np.array([242, 241, 245], np.uint8)
PATCH = 256


class BlobRender:
    """Cheap ``render(x, y, w, h, downsample)``: tissue blobs filled with tiled H&E patches."""

    def __init__(self, size: int, seed: int = 0, coarse: int = 1024):
        rng = np.random.default_rng(seed)
        noise = cv2.GaussianBlur(rng.standard_normal((coarse, coarse)).astype(np.float32), (0, 0), coarse / 40)
        yy, xx = np.mgrid[0:coarse, 0:coarse] / coarse
        vignette = np.minimum.reduce([xx, yy, 1 - xx, 1 - yy])  # no tissue at the slide's border
        field = noise / noise.std() + 6 * np.minimum(vignette, 0.1) - 0.8
        self.blobs = (field > 0).astype(np.uint8) * 255  # about 35-45% tissue
        # Pen strokes: three thick lines of green, blue and black ink across the coarse map.
        self.ink = np.zeros((coarse, coarse, 3), np.uint8)
        self.ink_mask = np.zeros((coarse, coarse), np.uint8)
        for i, colour in enumerate([(30, 140, 80), (30, 60, 170), (35, 35, 40)]):
            p0 = (int(coarse * (0.2 + 0.25 * i)), int(coarse * 0.15))
            p1 = (int(coarse * (0.3 + 0.25 * i)), int(coarse * 0.45))
            cv2.line(self.ink, p0, p1, colour, 4)
            cv2.line(self.ink_mask, p0, p1, 255, 4)
        self.size, self.coarse = size, coarse
        scene = HEScene(2048, 2048, seed=seed, mpp=0.5, tissue_fraction=0.95)
        cands = [scene.render(x, y, PATCH, PATCH) for y in range(0, 2048, PATCH) for x in range(0, 2048, PATCH)]
        cands.sort(key=lambda p: float(p.mean()))
        self.patches = cands[:12]  # the most tissue-filled ones

    def _map(self, img: np.ndarray, x: float, y: float, w: int, h: int, ds: float, interp) -> np.ndarray:
        """Crop of a coarse map covering the output rectangle, resized to (h, w)."""
        s = self.coarse / self.size
        m = np.float32([[ds * s, 0, x * s], [0, ds * s, y * s]])
        return cv2.warpAffine(img, m, (w, h), flags=interp | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)

    def __call__(self, x: float, y: float, w: int, h: int, ds: float) -> np.ndarray:
        tissue = self._map(self.blobs, x, y, w, h, ds, cv2.INTER_LINEAR)
        out = np.broadcast_to(GLASS, (h, w, 3)).copy()
        if tissue.any():
            k = int(x // (PATCH * ds) * 7 + y // (PATCH * ds) * 13) % len(self.patches)
            tex = self.patches[k]
            if (h, w) != tex.shape[:2]:
                tex = np.tile(tex, (-(-h // PATCH), -(-w // PATCH), 1))[:h, :w]
            a = (tissue.astype(np.uint16)[..., None])
            out = ((tex * a + out * (255 - a)) // 255).astype(np.uint8)
        ink = self._map(self.ink_mask, x, y, w, h, ds, cv2.INTER_NEAREST)
        if ink.any():
            colour = self._map(self.ink, x, y, w, h, ds, cv2.INTER_NEAREST)
            out = np.where(ink[..., None] > 0, (out.astype(np.uint16) * colour // 255).astype(np.uint8), out)
        return out


def generate(path: Path, size: int, workers: int) -> float:
    t0 = time.monotonic()
    render = BlobRender(size)
    write_slide(path, size, size, render, mpp=0.5, objective=20, downsamples=(1, 4, 16, 64),
                workers=workers, metadata={"Title": "slidesnake tiling benchmark"})
    return time.monotonic() - t0


def _tree_pss_kb(root: int) -> int:
    """Sum of PSS (kB) over ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            m = re.search(r"^Pss:\s+(\d+) kB", open(f"/proc/{pid}/smaps_rollup").read(), re.M)
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def run_pipeline(workdir: Path, slide: Path, cores: int) -> dict:
    (workdir / "samples.tsv").write_text(f"slide_id\tpatient_id\tlabel\tpath\nBIG\tP1\ttumour\t{slide}\n")
    (workdir / "config.yaml").write_text("samples: samples.tsv\nclasses: [normal, tumour]\n"
                                         "tiling: {magnifications: [20]}\n")
    for d in ("results", "logs", "benchmarks"):
        subprocess.run(["rm", "-rf", str(workdir / d)], check=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "snakemake", "--snakefile",
           str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(workdir / "config.yaml"), "--cores", str(cores), "results/qc/BIG/qc.json"]
    peak = [0]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss_kb(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    out, _ = proc.communicate()
    wall = time.monotonic() - t0
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"snakemake failed:\n{out[-5000:]}")
    maxrss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out).group(1))
    bench = {r: pd.read_csv(workdir / "benchmarks" / r / "BIG.tsv", sep="\t").iloc[0]
             for r in ("tile", "filter_tissue")}
    qc = json.loads((workdir / "results" / "qc" / "BIG" / "qc.json").read_text())
    tiles = pd.read_parquet(workdir / "results" / "tissue" / "BIG" / "tiles.parquet")
    log = (workdir / "logs" / "filter_tissue" / "BIG.log").read_text()
    return {"wall_s": wall, "time_maxrss_mb": maxrss / 1024, "tree_pss_mb": peak[0] / 1024, "bench": bench,
            "qc": qc, "tiles": tiles, "log": log}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/slidesnake-bench"))
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.workdir / f"big_{args.size}.svs"
    if not slide.exists():
        print(f"writing {slide} ({args.size} x {args.size} px) ...", flush=True)
        print(f"written in {generate(slide, args.size, args.cores):.0f} s, {slide.stat().st_size / 2**20:.0f} MiB")
    r = run_pipeline(args.workdir, slide, args.cores)
    q, b = r["qc"], r["bench"]
    m = q["magnifications"]["20"]
    tile_s, filt_s = float(b["tile"]["s"]), float(b["filter_tissue"]["s"])
    filt_cpu = float(b["filter_tissue"]["cpu_time"])
    read = q["tiles_read"]
    mb = lambda rule, col: f"{float(b[rule][col]):.0f}"  # noqa: E731
    print(f"\n| slide | {args.size} x {args.size} px, 0.5 um/px (20x), {slide.stat().st_size / 2**20:.0f} MiB, "
          f"levels {q['level_downsamples']} |")
    print("|---|---|")
    print(f"| tissue filter | methods {'+'.join(q['tissue_filter']['methods'])}, combine "
          f"{q['tissue_filter']['combine']} |")
    print(f"| tiles at 20x | {m['tiles']}: {m['kept']} kept, {m['artefact']} rejected as artefacts; "
          f"{read} read |")
    print(f"| tissue mask | {q['mask']['shape'][1]} x {q['mask']['shape'][0]} px, "
          f"{q['mask']['tissue_area_mm2']:.0f} mm2 |")
    print(f"| rule tile | {tile_s:.1f} s wall |")
    print(f"| rule filter_tissue | {filt_s:.0f} s wall, {filt_cpu:.0f} s CPU ({args.cores} worker processes) |")
    print(f"| tiles read per CPU second (per core) | {read / filt_cpu:.0f} |")
    print(f"| tiles read per wall second | {read / filt_s:.0f} ({read / filt_s / args.cores:.0f} per core; "
          f"the job used {float(b['filter_tissue']['mean_load']):.0f}% of one core on average) |")
    print(f"| peak RSS, /usr/bin/time -v (largest single process) | {r['time_maxrss_mb']:.0f} MB |")
    print(f"| peak memory of the filter_tissue job (Snakemake benchmark, parent + workers) | "
          f"PSS {mb('filter_tissue', 'max_pss')} MB, USS {mb('filter_tissue', 'max_uss')} MB, "
          f"RSS summed {mb('filter_tissue', 'max_rss')} MB |")
    print(f"| peak memory of the tile job | PSS {mb('tile', 'max_pss')} MB, RSS {mb('tile', 'max_rss')} MB |")
    print(f"| peak PSS of the whole process tree, sampled every 0.5 s (snakemake included) | "
          f"{r['tree_pss_mb']:.0f} MB |")
    print(f"| snakemake wall time | {r['wall_s']:.0f} s |")
    print("\nfilter_tissue log:\n" + r["log"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
