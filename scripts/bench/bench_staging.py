"""Tile reading with and without node-local staging (features.stage_dir; docs/cluster.md).

Reads every 20x tile of a slide (OpenSlide read + JPEG decode, as extract_features does through
slidesnake.tiling.TileReader) three ways, each round:

* **in place, cold**: the slide's pages evicted from the page cache first
  (``posix_fadvise(DONTNEED)``, this file only), so every tile is a disk read;
* **in place, warm**: again, from the page cache;
* **staged**: cache evicted, the slide copied to the stage directory (slidesnake.staging.staged),
  then read from the copy, and the copy removed -- the copy's time included.

On a local disk (this machine) staging can only add the copy; on a network filesystem with
milliseconds of latency per small read it replaces one round trip per tile by one sequential copy.
``--latency-ms`` adds that latency to every in-place tile read (a sleep per read, the tile's
OpenSlide read itself unchanged) to show where the two cross.

    .venv/bin/python scripts/bench/bench_staging.py --slide /tmp/b18/bundle/synthetic_12000.svs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: str, tiles, latency_s: float = 0.0) -> float:
    from slidesnake.tiling import TileReader

    reader = TileReader(path, 224, 0, True, slide_id="bench")
    t0 = time.perf_counter()
    for d, lvl, c, r in tiles:
        reader.read_native(d, lvl, c, r)
        if latency_s:
            time.sleep(latency_s)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", type=Path, required=True)
    ap.add_argument("--tiles", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--stage-dir", default=None, help="default: a temporary directory on local disk")
    args = ap.parse_args(argv)

    from bench_features import bench_tiles
    from slidesnake.staging import staged

    grid = bench_tiles(args.slide, 224, args.tiles)
    tiles = grid[["dz_tile_size", "dz_level", "col", "row"]].to_numpy().tolist()
    size_mb = args.slide.stat().st_size / 1e6
    lat = args.latency_ms / 1000
    rows = {"in place, cold": [], "in place, warm": [], "staged (copy + read)": [], "copy alone": []}
    with tempfile.TemporaryDirectory() as tmp:
        stage = args.stage_dir or tmp
        for _ in range(args.rounds):
            evict(args.slide)
            rows["in place, cold"].append(read_all(str(args.slide), tiles, lat))
            rows["in place, warm"].append(read_all(str(args.slide), tiles, lat))
            evict(args.slide)
            t0 = time.perf_counter()
            with staged(args.slide, stage, slide_id="bench") as local:
                copied = time.perf_counter() - t0
                read_all(local, tiles)
            rows["staged (copy + read)"].append(time.perf_counter() - t0)
            rows["copy alone"].append(copied)
    print(f"{args.slide.name}: {size_mb:.0f} MB, {len(tiles)} tiles of 224 px at 20x; median of {args.rounds} "
          f"rounds; added latency per in-place read {args.latency_ms:g} ms; load {os.getloadavg()[0]:.1f}\n")
    print("| | seconds | tiles/s | MB/s of the file |\n|---|---:|---:|---:|")
    for k, v in rows.items():
        s = statistics.median(v)
        tps = f"{len(tiles) / s:.0f}" if k != "copy alone" else "-"
        print(f"| {k} | {s:.2f} | {tps} | {size_mb / s:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
