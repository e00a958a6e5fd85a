"""Cost of checking a feature store against its integrity manifest (slidesnake.integrity).

A store the size of a resection slide's at 20x (default 25,000 tiles x 1024 features, float16, as
written by StoreWriter), then, best of --repeat: opening it without verification, with the cheap
check (sizes and metadata only), with the full check (sha256 of every byte), and reading the
features as training does. Page cache warm (the file was just written), as in a run where extraction
precedes training; --drop-caches (root) measures it cold as well.

    PYTHONPATH=scripts python scripts/bench/bench_store_verify.py --tiles 25000 --dim 1024
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from slidesnake.integrity import build_manifest, verify_store
from slidesnake.store import StoreWriter, open_store


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def drop_caches():
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=25000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=a.dir))
    path = root / "S.zarr"
    rng = np.random.default_rng(0)
    n = a.tiles
    feats = rng.normal(size=(n, a.dim)).astype(np.float16)
    t = time.perf_counter()
    with StoreWriter(path, {"slide_id": "S"}, {20.0: n}, a.dim, "float16") as w:
        for s in range(0, n, 4096):
            w.write(20.0, s, feats[s:s + 4096])
        w.set(20.0, "coords", np.arange(2 * n).reshape(n, 2))
        w.set(20.0, "size", np.full((n, 2), 448))
        w.set(20.0, "grid", np.arange(2 * n).reshape(n, 2))
        w.set(20.0, "tile_id", np.arange(n))
    write_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    manifest_s = best(lambda: build_manifest(path, {"slide_id": "S"}), a.repeat)
    rows = {
        "open, no check": best(lambda: open_store(path, verify=False), a.repeat),
        "check sizes + metadata": best(lambda: verify_store(path, full=False), a.repeat),
        "check every byte (default)": best(lambda: verify_store(path), a.repeat),
        "open (default) + read features": best(lambda: open_store(path).features(20.0), a.repeat),
        "read features, no check": best(lambda: open_store(path, verify=False).features(20.0), a.repeat),
    }
    if a.drop_caches:
        def cold(fn):
            drop_caches()
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        rows["cold: open (default) + read features"] = cold(lambda: open_store(path).features(20.0))
        rows["cold: read features, no check"] = cold(lambda: open_store(path, verify=False).features(20.0))
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, {platform.python_version()}")
    print(f"store: {n} tiles x {a.dim} float16, {size / 2**20:.1f} MiB on disk, "
          f"{sum(1 for p in path.rglob('*') if p.is_file())} files; written in {write_s:.2f} s "
          f"(manifest: {manifest_s:.3f} s of it)")
    for k, v in rows.items():
        print(f"  {k:40s} {v * 1000:8.1f} ms")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
