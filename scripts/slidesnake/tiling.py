"""Tile grids on OpenSlide DeepZoom levels, at magnifications chosen from each slide's own base.

See docs/design.md ("Tile grid") for the level arithmetic and the grid table's columns.
"""

from __future__ import annotations

import copy
import logging
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import openslide
import pandas as pd
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from slidesnake.geometry import (  # noqa: F401  (also imported from here)
    MPP_AT_1X, Target, mag_label, parent_indices, parse_target, parse_targets)
from slidesnake.slide import Resolution, SlideError, pixel_errors

log = logging.getLogger(__name__)

GRID_COLUMNS = ["tile_id", "magnification", "dz_tile_size", "dz_level", "col", "row", "x", "y", "w", "h"]


def dz_overlap(overlap: int, tile_size: int, dz_tile_size: int) -> int:
    """DeepZoom overlap (pixels of the level read) that spans ``overlap`` output pixels."""
    return int(round(overlap * dz_tile_size / tile_size))


@dataclass(frozen=True)
class LevelPlan:
    """How one target magnification is read from a slide."""

    magnification: float
    target: str            # the config entry, e.g. "20x" or "0.5um"
    target_mpp: float | None
    downsample: float      # level-0 pixels per output pixel
    dz_level: int          # DeepZoom level read
    dz_downsample: int     # 2 ** k: downsample of that DeepZoom level
    dz_tile_size: int      # DeepZoom tile size, resized to tile_size when it differs
    dz_overlap: int        # DeepZoom overlap (pixels of the level read), resized to overlap
    upsampled: bool

    def to_dict(self) -> dict:
        return asdict(self)


def plan_level(
    dz_level_count: int,
    base_magnification: float,
    target: float,
    tile_size: int,
    *,
    overlap: int = 0,
    allow_upsample: bool = False,
    slide_id: str = "?",
    path: str = "",
) -> LevelPlan:
    """Pick the DeepZoom level for magnification ``target`` on a slide of base ``base_magnification``."""
    return plan_target(dz_level_count, Resolution(MPP_AT_1X / base_magnification, "", base_magnification, ""),
                       Target(float(target)), tile_size, overlap=overlap, allow_upsample=allow_upsample,
                       slide_id=slide_id, path=path)


def plan_target(
    dz_level_count: int,
    resolution: Resolution,
    target: Target,
    tile_size: int,
    *,
    overlap: int = 0,
    allow_upsample: bool = False,
    slide_id: str = "?",
    path: str = "",
) -> LevelPlan:
    """Pick the DeepZoom level for ``target`` from the slide's own resolution.

    With ``d`` = level-0 pixels per output pixel, the finest DeepZoom level whose power-of-two
    downsample does not exceed ``d`` is read, with a tile size scaled so that a tile always covers
    ``tile_size * d`` level-0 pixels. ``d < 1`` (upsampling) is refused unless allowed.
    """
    d = target.downsample(resolution)
    if d < 1 - 1e-6 and not allow_upsample:
        if target.mpp:
            problem = f"target {target.mpp:g} um/px is finer than the slide's {resolution.mpp:g} um/px"
        else:
            problem = (f"magnification {target.magnification:g}x is above the slide's base "
                       f"{resolution.objective_power:g}x")
        raise SlideError(slide_id, path, problem,
                         "drop it from tiling.magnifications or set tiling.allow_upsample: true")
    k = max(0, math.floor(math.log2(d) + 1e-6)) if d > 0 else 0
    k = min(k, dz_level_count - 1)
    dz_tile = max(1, round(tile_size * d / 2**k))
    return LevelPlan(
        magnification=float(target.magnification), target=target.name, target_mpp=target.mpp,
        downsample=d, dz_level=dz_level_count - 1 - k, dz_downsample=2**k, dz_tile_size=int(dz_tile),
        dz_overlap=dz_overlap(overlap, tile_size, dz_tile), upsampled=d < 1 - 1e-6,
    )


def l0_offset(slide: openslide.AbstractSlide, limit_bounds: bool) -> tuple[int, int]:
    if not limit_bounds:
        return 0, 0
    p = slide.properties
    return int(p.get(openslide.PROPERTY_NAME_BOUNDS_X, 0)), int(p.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0))


def build_grid(
    slide: openslide.AbstractSlide,
    resolution: Resolution,
    magnifications: list,
    tile_size: int,
    *,
    overlap: int = 0,
    limit_bounds: bool = False,
    allow_upsample: bool = False,
    slide_id: str = "?",
    path: str = "",
) -> tuple[pd.DataFrame, dict]:
    """The full-tile grid at every magnification, and per-magnification metadata.

    ``magnifications`` holds ``tiling.magnifications`` entries (see :func:`parse_target`). Partial
    tiles at the right and bottom edges are dropped (and counted), so every tile has the same
    physical size. Each tile of a finer magnification gets the ``tile_id`` of the tile containing
    its centre at every coarser one (columns ``parent_<m>x``, see :func:`add_parent_columns`).
    """
    frames, info = [], {}
    ox, oy = l0_offset(slide, limit_bounds)
    level_count = DeepZoomGenerator(slide, tile_size=tile_size, overlap=0, limit_bounds=limit_bounds).level_count
    for target in parse_targets(magnifications):
        plan = plan_target(level_count, resolution, target, tile_size, overlap=overlap,
                           allow_upsample=allow_upsample, slide_id=slide_id, path=path)
        dz = DeepZoomGenerator(slide, tile_size=plan.dz_tile_size, overlap=0, limit_bounds=limit_bounds)
        level_w, level_h = dz.level_dimensions[plan.dz_level]
        cols_all, rows_all = dz.level_tiles[plan.dz_level]
        ncol, nrow = level_w // plan.dz_tile_size, level_h // plan.dz_tile_size
        col, row = np.meshgrid(np.arange(ncol), np.arange(nrow))
        col, row = col.ravel(), row.ravel()
        # A DeepZoom level's downsample is exactly 2**k (DeepZoom rounds level sizes up).
        step = plan.dz_tile_size * plan.dz_downsample
        frames.append(pd.DataFrame({
            "magnification": np.full(len(col), plan.magnification, np.float64),
            "dz_tile_size": np.full(len(col), plan.dz_tile_size, np.int32),
            "dz_level": np.full(len(col), plan.dz_level, np.int32),
            "col": col.astype(np.int32),
            "row": row.astype(np.int32),
            "x": (ox + col * step).astype(np.int64),
            "y": (oy + row * step).astype(np.int64),
            "w": np.full(len(col), step, np.int64),
            "h": np.full(len(col), step, np.int64),
        }))
        info[f"{plan.magnification:g}"] = {
            **plan.to_dict(),
            "tile_um": tile_size * plan.downsample * resolution.mpp,
            "tile_um_y": tile_size * plan.downsample * resolution.mpp_y,
            "n_tiles": int(ncol * nrow),
            "n_partial_dropped": int(cols_all * rows_all - ncol * nrow),
        }
    grid = pd.concat(frames, ignore_index=True)
    grid.insert(0, "tile_id", np.arange(len(grid), dtype=np.int64))
    return add_parent_columns(grid[GRID_COLUMNS]), info


def add_parent_columns(grid: pd.DataFrame) -> pd.DataFrame:
    """Add ``parent_<m>x`` (int64) for every magnification ``m`` of the grid but the finest.

    For a tile at a finer magnification it is the ``tile_id`` of the ``m`` tile containing the
    tile's centre, -1 when that falls in a dropped partial tile; rows at ``m`` or coarser hold -1.
    """
    mags = sorted(grid["magnification"].unique())
    out = grid.copy()
    mag_of = grid["magnification"].to_numpy()
    for coarse in mags[:-1]:
        col = np.full(len(grid), -1, np.int64)
        c = grid[mag_of == coarse]
        fine = mag_of > coarse
        rows = parent_indices(grid.loc[fine, ["x", "y"]], grid.loc[fine, ["w", "h"]],
                              c[["x", "y"]], c[["w", "h"]])
        col[fine] = np.where(rows >= 0, c["tile_id"].to_numpy()[rows], -1)
        out[f"parent_{mag_label(coarse)}"] = col
    return out


def slide_metadata(slide: openslide.AbstractSlide, slide_id: str, path: str, resolution: Resolution) -> dict:
    from slidesnake.readers import PROPERTY_MODALITY, PROPERTY_SCANNER, reader_of, slide_properties

    p = slide_properties(slide)
    return {
        "slide_id": slide_id,
        "path": str(path),
        "vendor": p.get(openslide.PROPERTY_NAME_VENDOR, type(slide).__name__),
        "reader": reader_of(slide),
        "scanner": p.get(PROPERTY_SCANNER) or _scanner(p),
        "modality": p.get(PROPERTY_MODALITY),
        "dimensions": list(slide.dimensions),
        "level_count": slide.level_count,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": [float(d) for d in slide.level_downsamples],
        **resolution.to_dict(),
    }


def _scanner(props) -> str | None:
    """Scanner named in vendor properties OpenSlide exposes (Aperio ScanScope ID, Hamamatsu product, ...)."""
    for key in ("aperio.ScanScope ID", "hamamatsu.Product", "leica.device-model", "philips.DICOM_MANUFACTURER",
                "dicom.Manufacturer", "tiff.Make"):
        if props.get(key):
            return f"{props.get(openslide.PROPERTY_NAME_VENDOR, '')} {props[key]}".strip()
    return None


class TileReader:
    """Reads grid tiles from a slide as uint8 RGB arrays of ``tile_size + 2 * overlap``; one per process.

    Every tile covers the same physical area: ``tile_size + 2 * overlap`` output pixels centred on the
    grid tile. DeepZoom leaves out the overlap on the slide's first row and column (and beyond its
    last); those sides are padded with the slide's background colour, never stretched. With
    ``dz_tile_size != tile_size`` the DeepZoom overlap is scaled likewise (:func:`dz_overlap`).

    Opens its slide handle lazily (through :func:`slidesnake.slide.open_slide` with ``reader``), so instances can be created in a parent process and used in
    DataLoader or multiprocessing workers. Pixel-decoding errors are raised as one-line SlideErrors.
    """

    def __init__(self, path: str | os.PathLike, tile_size: int, overlap: int = 0, limit_bounds: bool = False,
                 slide_id: str | None = None, reader: str = "auto"):
        self.path, self.tile_size, self.overlap, self.limit_bounds = str(path), tile_size, overlap, limit_bounds
        self.reader = reader or "auto"  # slide.json's "reader": the library that made the grid
        self.slide_id = slide_id or os.path.basename(self.path)
        self._slide = None
        self._dz: dict[int, DeepZoomGenerator] = {}

    def __getstate__(self):
        return {**self.__dict__, "_slide": None, "_dz": {}}

    def fresh(self) -> "TileReader":
        """A copy without open handles (for a forked worker: never share the parent's handle)."""
        return copy.copy(self)  # goes through __getstate__

    def _generator(self, dz_tile_size: int) -> DeepZoomGenerator:
        if self._slide is None:
            from slidesnake.slide import open_slide

            self._slide = open_slide(self.path, self.slide_id, self.reader)
            self._bg = "#" + self._slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")
        if dz_tile_size not in self._dz:
            self._dz[dz_tile_size] = DeepZoomGenerator(
                self._slide, tile_size=dz_tile_size, limit_bounds=self.limit_bounds,
                overlap=dz_overlap(self.overlap, self.tile_size, dz_tile_size))
        return self._dz[dz_tile_size]

    def prepare(self, dz_tile_size: int) -> None:
        """Open the slide and the DeepZoom generator of ``dz_tile_size`` now (before threads share
        this reader, which then only read); an unopenable slide is a one-line SlideError."""
        with pixel_errors(self.slide_id, self.path):
            self._generator(int(dz_tile_size))

    def native_size(self, dz_tile_size: int) -> int:
        """Side in pixels of :meth:`read_native`'s tiles."""
        return int(dz_tile_size) + 2 * dz_overlap(self.overlap, self.tile_size, int(dz_tile_size))

    def read_native(self, dz_tile_size: int, dz_level: int, col: int, row: int) -> Image.Image:
        """The tile at DeepZoom resolution, ``native_size(dz_tile_size)`` square, RGB."""
        dz_tile_size, col, row = int(dz_tile_size), int(col), int(row)
        with pixel_errors(self.slide_id, self.path):
            tile = self._generator(dz_tile_size).get_tile(int(dz_level), (col, row))
        side = self.native_size(dz_tile_size)
        if tile.size != (side, side):
            ov = dz_overlap(self.overlap, self.tile_size, dz_tile_size)
            canvas = Image.new("RGB", (side, side), self._bg)
            canvas.paste(tile, (ov if col == 0 else 0, ov if row == 0 else 0))
            tile = canvas
        return tile if tile.mode == "RGB" else tile.convert("RGB")

    def read(self, dz_tile_size: int, dz_level: int, col: int, row: int) -> np.ndarray:
        tile = self.read_native(dz_tile_size, dz_level, col, row)
        out = self.tile_size + 2 * self.overlap
        if tile.size != (out, out):
            tile = tile.resize((out, out), Image.BILINEAR)
        return np.asarray(tile)


ADDRESS_COLUMNS = ["dz_tile_size", "dz_level", "col", "row"]

_WORKER: tuple[TileReader, Callable] | None = None


def _init_worker(reader: TileReader, fn: Callable) -> None:
    global _WORKER
    _WORKER = (reader.fresh(), fn)


def _run_chunk(rows: np.ndarray) -> list:
    reader, fn = _WORKER
    return [fn(reader, row) for row in rows]


def map_tiles(fn: Callable, tiles: pd.DataFrame, reader: TileReader, threads: int = 1, *,
              chunk: int = 64, what: str = "read") -> list:
    """``[fn(reader, address) for each tile]`` in order, in ``threads`` worker processes.

    ``address`` is the tile's ``(dz_tile_size, dz_level, col, row)``; each worker has its own
    reader (own OpenSlide handle). Workers are forked where the platform can: spawn (and
    forkserver) re-import the parent's ``__main__``, which for a Snakemake script is the whole
    script (it would run again in every worker). ``fn`` must be a module-level function (or a
    ``functools.partial`` of one). Progress is logged about every 10%.
    """
    rows = tiles[ADDRESS_COLUMNS].to_numpy(np.int64)
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    if not chunks:
        return []
    t0, done, out = time.monotonic(), 0, []
    step = max(1, len(chunks) // 10)

    def results():
        if threads <= 1 or len(chunks) == 1:
            _init_worker(reader, fn)
            yield from map(_run_chunk, chunks)
            return
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(threads, initializer=_init_worker, initargs=(reader, fn)) as pool:
            yield from pool.imap(_run_chunk, chunks)

    for i, res in enumerate(results()):
        out.extend(res)
        done += len(res)
        if (i + 1) % step == 0 or done == len(rows):
            log.info("%s %d/%d tiles (%.0f tiles/s)", what, done, len(rows), done / (time.monotonic() - t0))
    return out


def export_tile(reader: TileReader, address, *, directory: str, fmt: str = "jpeg", quality: int = 90) -> None:
    """Write one tile as ``<directory>/<col>_<row>.<fmt>`` (CMA-MIL's patch naming)."""
    tile = reader.read(*address)
    _, _, col, row = (int(a) for a in address)
    Image.fromarray(tile).save(os.path.join(directory, f"{col}_{row}.{fmt}"), format=fmt.upper(),
                               **({"quality": int(quality)} if fmt == "jpeg" else {}))


def tile_slide(path: str | os.PathLike, slide_id: str, *, magnifications: list, tile_size: int, overlap: int = 0,
               limit_bounds: bool = False, allow_upsample: bool = False, mpp: float | None = None,
               default_mpp: float | None = None, default_objective: float | None = None,
               reader: str = "auto", logger: logging.Logger = log) -> tuple[pd.DataFrame, dict]:
    """Rule ``tile``: open a slide (reader layer), check it decodes, resolve its resolution and build
    its DeepZoom grid. Returns ``(grid, meta)``, meta being ``slide.json`` (reader, MPP and its
    source, per-magnification levels, warnings). Problems are one-line SlideErrors."""
    from slidesnake.slide import check_readable, open_slide, resolve_resolution

    slide = open_slide(path, slide_id, reader)
    check_readable(slide, slide_id, path)
    res = resolve_resolution(slide.properties, slide_id, path, mpp_override=mpp,
                             default_mpp=default_mpp, default_objective=default_objective)
    logger.info("%s: %s reader; mpp %.4f x %.4f (%s), objective %gx (%s)", slide_id, _reader_name(slide),
                res.mpp, res.mpp_y, res.mpp_source, res.objective_power, res.objective_source)
    warnings = []
    if res.anisotropy > 0.02:
        warnings.append(f"pixels are not square (mpp x {res.mpp:.4f}, y {res.mpp_y:.4f}): tiles are "
                        f"{100 * res.anisotropy:.0f}% off square in microns")
    if abs(10 / res.mpp - res.objective_power) > 0.25 * res.objective_power:
        warnings.append(f"objective {res.objective_power:g}x ({res.objective_source}) disagrees with mpp "
                        f"{res.mpp:.4f} (~{10 / res.mpp:.0f}x); magnifications follow the objective, "
                        "pixel-size targets ('0.5um') the mpp")
    grid, levels = build_grid(slide, res, magnifications, tile_size, overlap=overlap, limit_bounds=limit_bounds,
                              allow_upsample=allow_upsample, slide_id=slide_id, path=str(path))
    for mag, info in levels.items():
        logger.info("%sx (%s): DeepZoom level %d (downsample %d), tile %d px -> %d px (%.1f um), %d tiles%s",
                    mag, info["target"], info["dz_level"], info["dz_downsample"], info["dz_tile_size"],
                    tile_size, info["tile_um"], info["n_tiles"], " UPSAMPLED" if info["upsampled"] else "")
        if info["upsampled"]:
            warnings.append(f"{info['target']} is above the slide's resolution: tiles are upsampled "
                            f"{1 / info['downsample']:.2f}x")
    for w in warnings:
        logger.warning("%s: %s", slide_id, w)
    from slidesnake.audit import content_hash

    meta = {**slide_metadata(slide, slide_id, str(path), res), "tile_size": tile_size, "overlap": overlap,
            "limit_bounds": limit_bounds, "magnifications": levels, "warnings": warnings,
            "content_hash": content_hash(path)}
    slide.close()
    return grid, meta


def _reader_name(slide) -> str:
    from slidesnake.readers import reader_of

    return reader_of(slide)
