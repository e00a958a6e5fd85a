"""Tile feature extraction: kept tiles of a slide -> backbone features in a Zarr feature store.

Tiles are read by DataLoader workers, each with its own OpenSlide handle, as uint8 CHW tensors;
conversion to float, resizing to the backbone's input size and normalisation happen on the
device in the main process. The same code runs on CUDA (bf16 autocast, channels_last) and on CPU
(float32); the store is written with :class:`slidesnake.store.StoreWriter` (temporary path,
renamed into place on success). See docs/design.md, "Feature store".
"""

from __future__ import annotations

import logging
import os
import time
from typing import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import slidesnake
from slidesnake.backbones import Backbone, create_backbone
from slidesnake.store import FeatureStore, StoreWriter, open_store
from slidesnake.tiling import TileReader

__all__ = ["TileDataset", "extract_slide", "open_store", "FeatureStore", "resolve_device"]

log = logging.getLogger(__name__)

TILE_COLUMNS = ("tile_id", "magnification", "dz_tile_size", "dz_level", "col", "row",
                "x", "y", "w", "h", "keep")
CHUNK_ROWS = 4096  # rows per Zarr chunk; features are written in whole chunks


class TileDataset(Dataset):
    """Kept tiles of one slide as uint8 (3, S, S) tensors, S = tile_size + 2 * overlap.

    Reading is :class:`slidesnake.tiling.TileReader`'s: its OpenSlide handle and DeepZoom
    generators (one per ``dz_tile_size``) open lazily in the process that reads, so every
    DataLoader worker has its own and none is ever pickled.
    """

    def __init__(self, slide_path: str | os.PathLike, tiles: pd.DataFrame, tile_size: int,
                 overlap: int = 0, limit_bounds: bool = True):
        self.reader = TileReader(slide_path, int(tile_size), int(overlap), bool(limit_bounds))
        self._address = tiles[["dz_tile_size", "dz_level", "col", "row"]].to_numpy(np.int64)

    def __len__(self) -> int:
        return len(self._address)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.reader.read(*self._address[i]).copy()).permute(2, 0, 1)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is taken as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _describe(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus - 1))


class _Embedder:
    """uint8 batch on the host -> float32 features on the host, all tensor work on ``device``."""

    def __init__(self, backbone: Backbone, device: torch.device):
        self.device = device
        self.dtype = backbone.compute_dtype(device)
        self.size = backbone.input_size
        self.channels_last = device.type == "cuda"
        self.model = backbone.model.to(device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # one input shape throughout
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std)
        self.shift = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
        self.scale = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.to(self.device, non_blocking=True).float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = (x - self.shift) / self.scale
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            y = self.model(x)
        return y.float().cpu().numpy()


class _Progress:
    """Log tiles done / total and throughput about every 10% (one line each, for SLURM logs)."""

    def __init__(self, slide_id: str, total: int, step: float = 0.1):
        self.slide_id, self.total = slide_id, total
        self.step = max(1, int(np.ceil(total * step)))
        self.next = self.step
        self.t0 = time.perf_counter()

    def update(self, done: int) -> None:
        if done < self.next and done < self.total:
            return
        self.next = (done // self.step + 1) * self.step
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else float("nan")
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        log.info("%s: %d/%d tiles (%3.0f%%), %.1f tiles/s, %.0f s elapsed, eta %.0f s",
                 self.slide_id, done, self.total, 100 * done / self.total, rate, dt, eta)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def _check_tiles(tiles: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in TILE_COLUMNS if c not in tiles.columns]
    if missing:
        raise ValueError(f"tiles table lacks columns {missing}")
    return tiles.sort_values("tile_id", kind="stable").reset_index(drop=True)


def extract_slide(
    slide_path: str | os.PathLike,
    tiles: pd.DataFrame,
    out_path: str | os.PathLike,
    *,
    slide_id: str,
    backbone: str,
    weights: str = "none",
    tile_size: int,
    overlap: int = 0,
    limit_bounds: bool = True,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    feature_dtype: str = "float16",
    threads: int | None = None,
    extra_attrs: Mapping | None = None,
) -> dict:
    """Extract features of the kept tiles of one slide into the store ``out_path``.

    Every magnification in ``tiles`` gets a group (possibly with N = 0); rows follow ``tile_id``.
    Returns a summary (tiles per magnification, seconds, tiles/s, device, precision).
    """
    if threads:
        torch.set_num_threads(int(threads))
    tiles = _check_tiles(tiles)
    mags = [float(m) for m in sorted(tiles["magnification"].unique())]
    # Grouped by magnification (each in tile_id order) so every group's rows arrive contiguously.
    kept = tiles[tiles["keep"].astype(bool)].sort_values("magnification", kind="stable")
    n_tiles = {m: int((kept["magnification"] == m).sum()) for m in mags}
    total = len(kept)

    dev = resolve_device(device)
    bb = create_backbone(backbone, weights=weights)
    embed = _Embedder(bb, dev)
    attrs = {
        **_jsonable(extra_attrs or {}), "slide_id": slide_id, **bb.provenance(),
        "precision": str(embed.dtype).removeprefix("torch."), "feature_dtype": feature_dtype,
        "tile_size": int(tile_size), "overlap": int(overlap), "limit_bounds": bool(limit_bounds),
        "device": str(dev), "slidesnake_version": slidesnake.__version__,
    }
    workers = default_num_workers() if num_workers is None else int(num_workers)
    log.info("%s: %d kept tiles of %d (%s), backbone %s (%s), device %s, %s, batch %d, %d workers",
             slide_id, total, len(tiles), ", ".join(f"{m:g}x: {n}" for m, n in n_tiles.items()) or "-",
             backbone, bb.weights, _describe(dev), attrs["precision"], batch_size, workers)
    if total == 0:
        log.warning("%s: no kept tiles; writing an empty feature store", slide_id)

    dataset = TileDataset(slide_path, kept, tile_size, overlap, limit_bounds)
    progress = _Progress(slide_id, total)
    with StoreWriter(out_path, attrs, n_tiles, bb.feature_dim, feature_dtype, CHUNK_ROWS) as writer:
        for m in mags:
            rows = kept[kept["magnification"] == m]
            writer.set(m, "coords", rows[["x", "y"]].to_numpy())
            writer.set(m, "size", rows[["w", "h"]].to_numpy())
            writer.set(m, "grid", rows[["col", "row"]].to_numpy())
            writer.set(m, "tile_id", rows["tile_id"].to_numpy())
        if total:
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                pin_memory=dev.type == "cuda", persistent_workers=False,
                                prefetch_factor=4 if workers else None)
            sink = _ChunkedSink(writer, n_tiles)
            for batch in loader:
                sink.add(embed(batch))
                progress.update(sink.done)
            sink.finish()
    seconds = progress.seconds
    summary = {"slide_id": slide_id, "out": str(out_path), "n_tiles": total,
               "n_tiles_per_magnification": {f"{m:g}x": n for m, n in n_tiles.items()},
               "feature_dim": bb.feature_dim, "seconds": round(seconds, 3),
               "tiles_per_s": round(total / seconds, 2) if total and seconds > 0 else None,
               "device": str(dev), "precision": attrs["precision"]}
    log.info("%s: wrote %s (%d tiles x %d, %s) in %.1f s", slide_id, out_path, total,
             bb.feature_dim, feature_dtype, seconds)
    return summary


class _ChunkedSink:
    """Route feature rows (arriving in dataset order: magnification groups one after the other) to
    their group and write them in whole Zarr chunks, so no chunk is rewritten batch by batch."""

    def __init__(self, writer: StoreWriter, n_tiles: Mapping[float, int]):
        self.writer = writer
        self.groups = [(m, n) for m, n in n_tiles.items() if n]
        self.done = 0
        self._g = 0                        # index into self.groups of the group being filled
        self._start = 0                    # first row of the pending block within that group
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def add(self, feats: np.ndarray) -> None:
        while len(feats):
            mag, n = self.groups[self._g]
            take = min(len(feats), n - self._start - self._n_pending)
            self._pending.append(feats[:take])
            self._n_pending += take
            self.done += take
            feats = feats[take:]
            if self._start + self._n_pending == n:       # group complete
                self._flush(all_rows=True)
                self._g, self._start = self._g + 1, 0
            elif self._n_pending >= CHUNK_ROWS:
                self._flush(all_rows=False)

    def _flush(self, all_rows: bool) -> None:
        block = np.concatenate(self._pending) if self._pending else np.empty((0, 0), np.float32)
        k = len(block) if all_rows else len(block) // CHUNK_ROWS * CHUNK_ROWS
        if k:
            self.writer.write(self.groups[self._g][0], self._start, block[:k])
        self._start += k
        self._pending = [block[k:]] if k < len(block) else []
        self._n_pending = len(block) - k

    def finish(self) -> None:
        expected = sum(n for _, n in self.groups)
        if self.done != expected or self._n_pending:
            raise RuntimeError(f"extracted {self.done} feature rows, expected {expected}")


def _jsonable(d: Mapping) -> dict:
    """numpy scalars -> Python scalars so that the attrs serialise to JSON."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d.items()}
