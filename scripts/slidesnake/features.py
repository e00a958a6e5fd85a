"""Tile feature extraction: kept tiles of a slide -> backbone features in a Zarr feature store.

Data path (one job per slide, every magnification in one pass):

* DataLoader workers read tiles, each worker with its own OpenSlide handle
  (:class:`slidesnake.tiling.TileReader` opens it lazily in the process that reads), and decode
  them straight into one uint8 ``(B, H, W, 3)`` array per batch (``TileDataset.__getitems__``).
  Without workers (the default on CPU, where the backbone keeps every core busy) the main
  process decodes each batch with one thread per CPU instead.
  Tiles are kept at their native DeepZoom size; a batch never mixes sizes (:func:`tile_batches`),
  so PIL only resizes the odd tile whose DeepZoom size differs within a group (edge tiles when
  ``overlap > 0``).
* On CUDA the batch lands in pinned memory (``pin_memory``) and is copied asynchronously as
  uint8 (4x fewer bytes than float); conversion to float, resizing to the backbone's input size
  (one batched ``F.interpolate(bilinear, antialias=True)``) and normalisation happen on the device.
* The backbone runs in channels-last layout (on CPU too: oneDNN's convolutions are ~1.5x faster
  in it than in NCHW) under bf16 autocast on CUDA (float32 on CPU; switchable, so the CPU tests
  exercise the CUDA branch), optionally ``torch.compile``-d (partial batches are then padded to
  one shape, so it compiles once).
  Features come back through pinned memory one batch late, so the GPU never waits for the host.
* Workers prefetch ``prefetch_factor`` batches each, so on CUDA reading and decoding overlap
  the GPU's compute.
* Rows are written in whole Zarr chunks by :class:`slidesnake.store.StoreWriter` (temporary path,
  renamed into place on success; ``parent_<m>x`` arrays are added on the way).

The store's schema is documented in docs/features.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import slidesnake
from slidesnake.backbones import Backbone, create_backbone
from slidesnake.devices import resolve_device
from slidesnake.io import Progress
from slidesnake.slide import SlideError
from slidesnake.store import FeatureStore, StoreWriter, open_store
from slidesnake.tiling import TileReader

__all__ = ["TileDataset", "extract_slide", "extract_job", "open_store", "FeatureStore", "resolve_device",
           "resolve_batch_size", "resolve_num_workers", "loader_options", "tile_batches"]

log = logging.getLogger(__name__)

TILE_COLUMNS = ("tile_id", "magnification", "dz_tile_size", "dz_level", "col", "row",
                "x", "y", "w", "h", "keep")
CHUNK_ROWS = 4096  # rows per Zarr chunk; features are written in whole chunks
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------
# reading


class TileDataset(Dataset):
    """Kept tiles of one slide at their native size ``S = dz_tile_size + 2 * overlap``.

    ``dataset[i]`` is a uint8 ``(3, S, S)`` tensor; ``dataset.__getitems__(indices)`` (what the
    DataLoader calls for a batch) is one uint8 ``(B, S, S, 3)`` tensor, the tiles decoded straight
    into it. The indices of a batch must share ``S`` (see :func:`tile_batches`). Tiles come from
    :meth:`TileReader.read_native`: on the slide's first row and column (and beyond its last),
    where DeepZoom leaves the overlap out, the missing side is padded with the slide's background
    colour, never stretched, so every tile covers the same physical area. Resizing to the
    backbone's input size happens on the device, batched.
    """

    def __init__(self, slide_path: str | os.PathLike, tiles: pd.DataFrame, tile_size: int,
                 overlap: int = 0, limit_bounds: bool = True, threads: int = 1, slide_id: str | None = None,
                 transform=None, reader: str = "auto"):
        self.reader = TileReader(slide_path, int(tile_size), int(overlap), bool(limit_bounds), slide_id=slide_id,
                                 reader=reader)
        # optional uint8 (S, S, 3) -> (S, S, 3) on each tile, e.g. stain normalisation (slidesnake.stainnorm)
        self.transform = transform
        self._address = tiles[["dz_tile_size", "dz_level", "col", "row"]].to_numpy(np.int64)
        # native side of every tile (the DeepZoom overlap scales with dz_tile_size / tile_size)
        native = {int(d): self.reader.native_size(int(d)) for d in np.unique(self._address[:, 0])}
        self.sizes = np.array([native[int(d)] for d in self._address[:, 0]], dtype=np.int64)
        self.threads = int(threads)  # decoding threads per batch (OpenSlide releases the GIL)
        self._pool = None

    def __getstate__(self):
        return {**self.__dict__, "_pool": None}

    def __len__(self) -> int:
        return len(self._address)

    def _read_into(self, out: np.ndarray, i: int) -> None:
        tile = self.reader.read_native(*self._address[i])
        side = out.shape[0]
        if tile.size != (side, side):
            tile = tile.resize((side, side), Image.BILINEAR)
        out[...] = self.transform(np.asarray(tile)) if self.transform is not None else np.asarray(tile)

    def __getitem__(self, i: int) -> torch.Tensor:
        side = int(self.sizes[i])
        out = np.empty((side, side, 3), np.uint8)
        self._read_into(out, i)
        return torch.from_numpy(out).permute(2, 0, 1)

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        sides = {int(self.sizes[i]) for i in indices}
        if len(sides) != 1:
            raise ValueError(f"a batch must hold tiles of one size, got sizes {sorted(sides)}")
        side = sides.pop()
        out = np.empty((len(indices), side, side, 3), np.uint8)
        if self.threads > 1 and len(indices) > 1:
            if self._pool is None:
                self.reader.prepare(int(self._address[indices[0], 0]))  # open the handle once
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tile-decode")
            list(self._pool.map(lambda ki: self._read_into(out[ki[0]], ki[1]), enumerate(indices)))
        else:
            for k, i in enumerate(indices):
                self._read_into(out[k], i)
        return torch.from_numpy(out)

    def close(self) -> None:
        """Stop the decoding threads (if any)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def tile_batches(sizes: np.ndarray, batch_size: int) -> list[list[int]]:
    """Consecutive runs of at most ``batch_size`` indices whose tiles have one native size.

    Tiles come grouped by magnification and one magnification has one DeepZoom tile size, so
    only the last batch of a size run is partial.
    """
    sizes = np.asarray(sizes)
    cuts = np.flatnonzero(np.diff(sizes)) + 1
    batches = []
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(sizes)]):
        batches.extend(list(range(a, min(a + batch_size, hi))) for a in range(int(lo), int(hi), batch_size))
    return batches


def _batch(x):
    """collate_fn: ``__getitems__`` already returns the batch tensor."""
    return x


# ---------------------------------------------------------------------------------------------
# machine-dependent defaults


def available_cpus() -> int:
    """CPUs this process may run on (the SLURM allocation or taskset, not the node's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_num_workers(num_workers: int | str | None, device: torch.device, cpus: int) -> int:
    """Tile-reading worker processes; ``"auto"``/None from the device and the CPUs at hand.

    CUDA: as many decoders as there are spare CPUs, up to 16 (a tile decodes in ~1 ms of CPU, a
    GPU embeds thousands per second), so decoding overlaps the GPU's work. CPU: none. The backbone
    keeps every core busy, so a decoder process can only take cores away from it (and leave
    torch's other threads spinning at their barriers): the main process decodes each batch with
    one thread per CPU between batches instead, which measured ~10% more tiles per CPU-second
    than one worker process (docs/benchmarks.md, "Feature extraction").
    """
    if num_workers not in (None, "auto"):
        return int(num_workers)
    if device.type == "cuda":
        return max(1, min(cpus - 1, 16))
    return 0


def resolve_batch_size(batch_size: int | str | None, device: torch.device, input_size: int = 224) -> int:
    """Tiles per batch; ``"auto"``/None from the device (GPU memory) and the backbone input size.

    224 px: 32 on CPU (larger batches gain nothing there), on CUDA 512 with >= 32 GiB, 256 with
    >= 12 GiB, else 64; scaled by ``(224 / input_size) ** 2`` and rounded down to a power of two.
    """
    if batch_size not in (None, "auto"):
        return int(batch_size)
    if device.type == "cuda":
        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        base = 512 if gib >= 32 else 256 if gib >= 12 else 64
    else:
        base = 32
    scaled = base * (224 / max(1, int(input_size))) ** 2
    return int(max(8, 2 ** math.floor(math.log2(max(1.0, scaled)))))


def loader_options(device: torch.device, num_workers: int) -> dict:
    """DataLoader settings: pinned batches on CUDA; workers (if any) prefetch enough batches to
    hide decoding behind compute (4 each on CUDA, 2 on CPU). ``persistent_workers`` is off: a job
    iterates its one loader (every magnification of the slide) exactly once, so there is no
    second epoch whose start it could speed up."""
    cuda = device.type == "cuda"
    return {"num_workers": num_workers, "pin_memory": cuda, "persistent_workers": False,
            "prefetch_factor": (4 if cuda else 2) if num_workers else None}


def _describe(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


# ---------------------------------------------------------------------------------------------
# compute


class _Pending:
    """Features of one batch, possibly still on their way to the host (an event marks arrival)."""

    def __init__(self, features: torch.Tensor, event=None):
        self.features, self.event = features, event

    def result(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.features.numpy()


class _Embedder:
    """uint8 ``(B, H, W, 3)`` batches on the host -> float32 features on the host.

    Everything from the uint8 copy on runs on ``device``: float conversion, resizing to the
    backbone's input size, normalisation, the backbone (autocast to ``precision``, channels-last
    layout, optionally compiled). ``precision="auto"`` is the backbone's preferred dtype on CUDA
    and float32 on CPU (bf16 may be forced on CPU, which exercises the CUDA branch).
    """

    def __init__(self, backbone: Backbone, device: torch.device, *, precision: str = "auto",
                 channels_last: bool = True, compile: bool = False, batch_size: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = device
        self.dtype = backbone.compute_dtype(device) if precision == "auto" else getattr(torch, precision)
        self.size = backbone.input_size
        self.channels_last = bool(channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.cuda = device.type == "cuda"
        model = backbone.model.to(device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # few input shapes throughout
        # A compiled model sees one input shape only: partial batches are padded to batch_size.
        self.pad_to = int(batch_size) if compile and batch_size else None
        self.model = torch.compile(model, dynamic=False) if compile else model
        self.compiled = bool(compile)
        # (x / 255 - mean) / std == x * weight + bias, one fused pass (addcmul) from uint8
        mean = torch.tensor(backbone.mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(backbone.std, dtype=torch.float64).view(1, 3, 1, 1)
        self.weight = (1 / (255 * std)).float().to(device)
        self.bias = (-mean / std).float().to(device)

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @torch.inference_mode()
    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` host batch -> normalised float ``(B, 3, S, S)`` on the device."""
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW view, NHWC in memory
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = torch.addcmul(self.bias, x, self.weight)  # uint8 or float -> normalised float
        return x.contiguous(memory_format=self.memory_format)

    @torch.inference_mode()
    def run(self, x: torch.Tensor) -> _Pending:
        """Backbone on a prepared batch; the features are copied to the host asynchronously."""
        n = len(x)
        if self.pad_to and n < self.pad_to:
            padded = torch.zeros((self.pad_to,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            padded[:n] = x
            x = padded.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            y = self.model(x)[:n].float()
        if not self.cuda:
            return _Pending(y)
        host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
        host.copy_(y, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Pending(host, event)

    def submit(self, batch: torch.Tensor) -> _Pending:
        return self.run(self.prepare(batch))

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.submit(batch).result()


def _check_tiles(tiles: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in TILE_COLUMNS if c not in tiles.columns]
    if missing:
        raise ValueError(f"tiles table lacks columns {missing}")
    return tiles.sort_values("tile_id", kind="stable").reset_index(drop=True)


def _group_attrs(rows: pd.DataFrame, tile_size: int, mpp) -> dict:
    """Per-magnification attributes: DeepZoom tile size and level, level-0 px per pixel, MPP."""
    out = {}
    for col in ("dz_tile_size", "dz_level"):
        values = rows[col].unique()
        if len(values) == 1:
            out[col] = int(values[0])
    widths = rows["w"].unique()
    if len(widths) == 1:
        out["downsample"] = float(widths[0]) / tile_size  # level-0 pixels per tile pixel
        if mpp is not None:
            out["mpp"] = float(mpp) * out["downsample"]
    return out


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
    batch_size: int | str | None = "auto",
    num_workers: int | str | None = "auto",
    device: str = "auto",
    feature_dtype: str = "float16",
    threads: int | None = None,
    compile: bool = False,
    precision: str = "auto",
    channels_last: bool = True,
    extra_attrs: Mapping | None = None,
    backbone_options: Mapping | None = None,
    tile_transform=None,
    reader: str = "auto",
) -> dict:
    """Extract features of the kept tiles of one slide into the store ``out_path``.

    Every magnification in ``tiles`` gets a group (possibly with N = 0); rows follow ``tile_id``.
    ``batch_size`` / ``num_workers`` ``"auto"`` resolve from the device and the CPUs (``threads``,
    else the CPUs this process may use); ``threads`` also sets torch's CPU threads. ``compile``
    runs the backbone through ``torch.compile``. ``precision`` ("auto": bf16 autocast on CUDA,
    float32 on CPU) can force the CUDA branch on CPU; ``channels_last`` (the default on every
    device) can be turned off. ``backbone_options`` are create_backbone's keyword options
    (backbone_kwargs, mean, std, pooling, strip_prefix, weights_sha256). ``tile_transform`` (e.g. a
    :class:`slidesnake.stainnorm.TileNormaliser`) is applied to every tile before the backbone and its
    ``provenance()`` is stored as the attribute ``stain_normalisation`` (``"none"`` without one).
    Returns a summary (tiles per magnification, seconds, tiles/s, device, precision, batch size, workers).
    """
    cpus = min(int(threads), available_cpus()) if threads else available_cpus()
    if threads:
        torch.set_num_threads(int(threads))
    tiles = _check_tiles(tiles)
    mags = [float(m) for m in sorted(tiles["magnification"].unique())]
    # Grouped by magnification (each in tile_id order) so every group's rows arrive contiguously.
    kept = tiles[tiles["keep"].astype(bool)].sort_values("magnification", kind="stable")
    n_tiles = {m: int((kept["magnification"] == m).sum()) for m in mags}
    total = len(kept)

    dev = resolve_device(device)
    bb, embed, batch = _model(backbone, weights, dev, batch_size, precision, channels_last, compile,
                              backbone_options)
    workers = resolve_num_workers(num_workers, dev, cpus)
    extra = _jsonable(extra_attrs or {})
    attrs = {
        **extra, "slide_id": slide_id, **bb.provenance(),
        "precision": embed.precision, "channels_last": embed.channels_last, "compiled": embed.compiled,
        "feature_dtype": feature_dtype, "tile_size": int(tile_size), "overlap": int(overlap),
        "limit_bounds": bool(limit_bounds), "device": str(dev),
        "slidesnake_version": slidesnake.__version__,
        "stain_normalisation": tile_transform.provenance() if tile_transform is not None else "none",
    }
    log.info("%s: %d kept tiles of %d (%s), backbone %s (%s), device %s, %s%s%s, batch %d, "
             "%d workers, %d torch threads",
             slide_id, total, len(tiles), ", ".join(f"{m:g}x: {n}" for m, n in n_tiles.items()) or "-",
             backbone, bb.weights, _describe(dev), embed.precision,
             ", channels-last" if embed.channels_last else "", ", compiled" if compile else "",
             batch, workers, torch.get_num_threads())
    if total == 0:
        log.warning("%s: no kept tiles; writing an empty feature store", slide_id)

    # Without workers, the main process decodes each batch with all its CPUs (between batches).
    dataset = TileDataset(slide_path, kept, tile_size, overlap, limit_bounds,
                          threads=1 if workers else cpus, slide_id=slide_id, transform=tile_transform, reader=reader)
    progress = Progress(slide_id, total, unit="tiles", logger=log)
    with StoreWriter(out_path, attrs, n_tiles, bb.feature_dim, feature_dtype, CHUNK_ROWS) as writer:
        for m in mags:
            rows = kept[kept["magnification"] == m]
            writer.set(m, "coords", rows[["x", "y"]].to_numpy())
            writer.set(m, "size", rows[["w", "h"]].to_numpy())
            writer.set(m, "grid", rows[["col", "row"]].to_numpy())
            writer.set(m, "tile_id", rows["tile_id"].to_numpy())
            writer.group_attrs(m, **_group_attrs(tiles[tiles["magnification"] == m], int(tile_size),
                                                 extra.get("mpp")))
        if total:
            loader = DataLoader(dataset, batch_sampler=tile_batches(dataset.sizes, batch),
                                collate_fn=_batch, **loader_options(dev, workers))
            sink = _ChunkedSink(writer, n_tiles, slide_id=slide_id, path=slide_path,
                                what=f"backbone {backbone} ({bb.weights})", dtype=feature_dtype)
            pending = None
            try:
                for tiles_batch in loader:
                    # Queue this batch before collecting the previous one's features: on CUDA the
                    # device then always has work while the host waits for a copy.
                    submitted = embed.submit(tiles_batch)
                    if pending is not None:
                        sink.add(pending.result())
                        progress.update(sink.done)
                    pending = submitted
            except RuntimeError as err:  # a worker's SlideError arrives as a RuntimeError with its text
                raise _worker_slide_error(err, slide_id, slide_path) or err
            sink.add(pending.result())
            progress.update(sink.done)
            sink.finish()
            dataset.close()
    seconds = progress.seconds
    summary = {"slide_id": slide_id, "out": str(out_path), "n_tiles": total,
               "n_tiles_per_magnification": {f"{m:g}x": n for m, n in n_tiles.items()},
               "feature_dim": bb.feature_dim, "seconds": round(seconds, 3),
               "tiles_per_s": round(total / seconds, 2) if total and seconds > 0 else None,
               "device": str(dev), "precision": attrs["precision"], "batch_size": batch,
               "num_workers": workers, "compiled": bool(compile)}
    log.info("%s: wrote %s (%d tiles x %d, %s) in %.1f s", slide_id, out_path, total,
             bb.feature_dim, feature_dtype, seconds)
    return summary


def extract_job(*, slide: str | os.PathLike, tiles: str | os.PathLike, out: str | os.PathLike, slide_id: str,
                mode: str = "fail", stage_dir: str | None = None, **kwargs) -> dict:
    """One ``extract_features`` job: the tiles table at ``tiles`` -> the store ``out``.

    ``mode`` is ``on_bad_slide`` (skip: a slide without a kept tile is a SlideError, so that it is
    excluded). ``stage_dir``: copy the slide there first and read the copy (slidesnake.staging).
    Other keyword arguments go to :func:`extract_slide`. The job script runs this in its own process
    or in a bundle's feature server (slidesnake.featserver).
    """
    from slidesnake.exclusion import NO_TISSUE_FIX
    from slidesnake.staging import staged

    table = pd.read_parquet(tiles)
    if mode == "skip" and not table["keep"].any():  # (fail: an empty store; training skips the empty bag)
        raise SlideError(slide_id, slide, "no kept tile at any magnification",
                         NO_TISSUE_FIX.replace("<slide>", slide_id))
    with staged(slide, stage_dir, slide_id=slide_id) as local:
        return extract_slide(local, table, out, slide_id=slide_id, **kwargs)


# The last backbone set up in this process, keyed by its whole configuration. A process that embeds
# several slides with one configuration (slidesnake.featserver: one per bundle of slides) builds the
# backbone, loads its weights and moves it to the device once; one entry, so a process that switches
# configurations never holds two models.
_MODEL_CACHE: dict[tuple, tuple] = {}


def _weights_key(weights: str) -> tuple:
    path = Path(str(weights)).expanduser()
    if str(weights) not in ("none", "imagenet") and path.is_file():
        st = path.stat()  # a checkpoint replaced under the same name is a new configuration
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    return (str(weights),)


def _model(backbone: str, weights: str, dev: torch.device, batch_size, precision: str,
           channels_last: bool, compile: bool, backbone_options: Mapping | None = None,
           ) -> tuple[Backbone, "_Embedder", int]:
    """(backbone, embedder, batch size) for this configuration, built once per process."""
    options = dict(backbone_options or {})
    key = (backbone, _weights_key(weights), json.dumps(options, sort_keys=True, default=str), str(dev),
           str(batch_size), precision, bool(channels_last), bool(compile))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        t0 = time.perf_counter()
        bb = create_backbone(backbone, weights=weights, **options)
        batch = resolve_batch_size(batch_size, dev, bb.input_size)
        embed = _Embedder(bb, dev, precision=precision, channels_last=channels_last, compile=compile,
                          batch_size=batch)
        _MODEL_CACHE[key] = (bb, embed, batch)
        log.info("backbone %s set up on %s in %.2f s", backbone, dev, time.perf_counter() - t0)
    else:
        log.info("backbone %s reused (already set up in this process)", backbone)
    return _MODEL_CACHE[key]


class _ChunkedSink:
    """Route feature rows (arriving in dataset order: magnification groups one after the other) to
    their group and write them in whole Zarr chunks, so no chunk is rewritten batch by batch."""

    def __init__(self, writer: StoreWriter, n_tiles: Mapping[float, int], *, slide_id: str = "?",
                 path: str | os.PathLike = "", what: str = "backbone", dtype: str = "float32"):
        self.writer = writer
        self.slide_id, self.path, self.what, self.dtype = slide_id, path, what, dtype
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
            self._check_finite(mag, feats[:take])
            self._pending.append(feats[:take])
            self._n_pending += take
            self.done += take
            feats = feats[take:]
            if self._start + self._n_pending == n:       # group complete
                self._flush(all_rows=True)
                self._g, self._start = self._g + 1, 0
            elif self._n_pending >= CHUNK_ROWS:
                self._flush(all_rows=False)

    def _check_finite(self, mag: float, feats: np.ndarray) -> None:
        """NaN / Inf features (also float16 overflow, > 65504) fail the slide, naming the magnification."""
        stored = feats.astype(self.dtype, copy=False)
        bad = ~np.isfinite(stored).all(axis=1)
        if bad.any():
            raise SlideError(
                self.slide_id, self.path,
                f"{self.what} gave non-finite (NaN/Inf) features at {mag:g}x for {int(bad.sum())} of "
                f"{len(feats)} tiles in a batch (stored as {self.dtype})",
                "check features.weights (a damaged or mismatched checkpoint), or use feature_dtype "
                "float32 if the values overflow float16")

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


def _worker_slide_error(err: RuntimeError, slide_id: str, path) -> SlideError | None:
    """The SlideError a DataLoader worker raised (torch re-raises it in the parent as a RuntimeError
    holding the worker's traceback text: its last line is the error's one line), else None."""
    marker = "SlideError: "
    text = str(err)
    if marker not in text:
        return None
    line = text.rsplit(marker, 1)[1].strip().splitlines()[0]
    prefix = f"slide {slide_id!r} ({path}): "
    body = line[len(prefix):] if line.startswith(prefix) else line
    problem, _, fix = body.rpartition("; ")
    return SlideError(slide_id, path, problem or body, fix)


def _jsonable(d: Mapping) -> dict:
    """numpy scalars -> Python scalars so that the attrs serialise to JSON."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d.items()}
