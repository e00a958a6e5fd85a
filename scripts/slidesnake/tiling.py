"""Tile grids on OpenSlide DeepZoom levels, at magnifications chosen from each slide's own base.

See docs/design.md ("Tile grid") for the level arithmetic and the grid table's columns.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import openslide
import pandas as pd
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from slidesnake.slide import Resolution, SlideError

GRID_COLUMNS = ["tile_id", "magnification", "dz_tile_size", "dz_level", "col", "row", "x", "y", "w", "h"]


@dataclass(frozen=True)
class LevelPlan:
    """How one target magnification is read from a slide."""

    magnification: float
    downsample: float      # level-0 pixels per output pixel (base / target)
    dz_level: int          # DeepZoom level read
    dz_downsample: int     # 2 ** k: downsample of that DeepZoom level
    dz_tile_size: int      # DeepZoom tile size, resized to tile_size when it differs
    upsampled: bool

    def to_dict(self) -> dict:
        return asdict(self)


def plan_level(
    dz_level_count: int,
    base_magnification: float,
    target: float,
    tile_size: int,
    *,
    allow_upsample: bool = False,
    slide_id: str = "?",
    path: str = "",
) -> LevelPlan:
    """Pick the DeepZoom level for ``target`` from the slide's own base magnification.

    The finest DeepZoom level whose power-of-two downsample does not exceed ``base / target`` is read,
    with a tile size scaled so that a tile always covers ``tile_size * base / target`` level-0 pixels.
    """
    d = base_magnification / target
    if d < 1 - 1e-6 and not allow_upsample:
        raise SlideError(
            slide_id, path,
            f"magnification {target:g}x is above the slide's base {base_magnification:g}x",
            "drop it from tiling.magnifications or set tiling.allow_upsample: true",
        )
    k = max(0, math.floor(math.log2(d) + 1e-6)) if d > 0 else 0
    k = min(k, dz_level_count - 1)
    dz_tile = max(1, round(tile_size * d / 2**k))
    return LevelPlan(
        magnification=float(target), downsample=d, dz_level=dz_level_count - 1 - k,
        dz_downsample=2**k, dz_tile_size=int(dz_tile), upsampled=d < 1 - 1e-6,
    )


def l0_offset(slide: openslide.AbstractSlide, limit_bounds: bool) -> tuple[int, int]:
    if not limit_bounds:
        return 0, 0
    p = slide.properties
    return int(p.get(openslide.PROPERTY_NAME_BOUNDS_X, 0)), int(p.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0))


def build_grid(
    slide: openslide.AbstractSlide,
    resolution: Resolution,
    magnifications: list[float],
    tile_size: int,
    *,
    overlap: int = 0,
    limit_bounds: bool = False,
    allow_upsample: bool = False,
    slide_id: str = "?",
    path: str = "",
) -> tuple[pd.DataFrame, dict]:
    """The full-tile grid at every magnification, and per-magnification metadata.

    Partial tiles at the right and bottom edges are dropped (and counted), so every tile has the
    same physical size.
    """
    frames, info = [], {}
    ox, oy = l0_offset(slide, limit_bounds)
    for mag in magnifications:
        probe = DeepZoomGenerator(slide, tile_size=tile_size, overlap=overlap, limit_bounds=limit_bounds)
        plan = plan_level(probe.level_count, resolution.objective_power, mag, tile_size,
                          allow_upsample=allow_upsample, slide_id=slide_id, path=path)
        dz = DeepZoomGenerator(slide, tile_size=plan.dz_tile_size, overlap=overlap, limit_bounds=limit_bounds)
        level_w, level_h = dz.level_dimensions[plan.dz_level]
        cols_all, rows_all = dz.level_tiles[plan.dz_level]
        ncol, nrow = level_w // plan.dz_tile_size, level_h // plan.dz_tile_size
        col, row = np.meshgrid(np.arange(ncol), np.arange(nrow))
        col, row = col.ravel(), row.ravel()
        # A DeepZoom level's downsample is exactly 2**k (DeepZoom rounds level sizes up).
        step = plan.dz_tile_size * plan.dz_downsample
        frames.append(pd.DataFrame({
            "magnification": float(mag),
            "dz_tile_size": np.int32(plan.dz_tile_size),
            "dz_level": np.int32(plan.dz_level),
            "col": col.astype(np.int32),
            "row": row.astype(np.int32),
            "x": (ox + col * step).astype(np.int64),
            "y": (oy + row * step).astype(np.int64),
            "w": np.int64(step),
            "h": np.int64(step),
        }))
        info[f"{mag:g}"] = {
            **plan.to_dict(),
            "tile_um": tile_size * plan.downsample * resolution.mpp,
            "n_tiles": int(ncol * nrow),
            "n_partial_dropped": int(cols_all * rows_all - ncol * nrow),
        }
    grid = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=GRID_COLUMNS[1:])
    grid.insert(0, "tile_id", np.arange(len(grid), dtype=np.int64))
    return grid[GRID_COLUMNS], info


def slide_metadata(slide: openslide.AbstractSlide, slide_id: str, path: str, resolution: Resolution) -> dict:
    p = slide.properties
    return {
        "slide_id": slide_id,
        "path": str(path),
        "vendor": p.get(openslide.PROPERTY_NAME_VENDOR, type(slide).__name__),
        "dimensions": list(slide.dimensions),
        "level_count": slide.level_count,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": [float(d) for d in slide.level_downsamples],
        **resolution.to_dict(),
    }


class TileReader:
    """Reads grid tiles from a slide as uint8 RGB arrays of ``tile_size``; one per process.

    Opens its OpenSlide handle lazily, so instances can be created in a parent process and used in
    DataLoader or multiprocessing workers.
    """

    def __init__(self, path: str | os.PathLike, tile_size: int, overlap: int = 0, limit_bounds: bool = False):
        self.path, self.tile_size, self.overlap, self.limit_bounds = str(path), tile_size, overlap, limit_bounds
        self._slide = None
        self._dz: dict[int, DeepZoomGenerator] = {}

    def __getstate__(self):
        return {**self.__dict__, "_slide": None, "_dz": {}}

    def _generator(self, dz_tile_size: int) -> DeepZoomGenerator:
        if self._slide is None:
            self._slide = openslide.open_slide(self.path)
        if dz_tile_size not in self._dz:
            self._dz[dz_tile_size] = DeepZoomGenerator(
                self._slide, tile_size=dz_tile_size, overlap=self.overlap, limit_bounds=self.limit_bounds)
        return self._dz[dz_tile_size]

    def read(self, dz_tile_size: int, dz_level: int, col: int, row: int) -> np.ndarray:
        tile = self._generator(int(dz_tile_size)).get_tile(int(dz_level), (int(col), int(row))).convert("RGB")
        out = self.tile_size + 2 * self.overlap
        if tile.size != (out, out):
            tile = tile.resize((out, out), Image.BILINEAR)
        return np.asarray(tile)


def parent_indices(fine_xy: np.ndarray, fine_wh: np.ndarray, coarse_xy: np.ndarray,
                   coarse_wh: np.ndarray) -> np.ndarray:
    """For each fine tile, the row of the coarse tile that contains its centre (-1 if none).

    All boxes are level-0 (x, y, w, h). Coarse tiles of one grid do not overlap (overlap 0) or
    overlap by a margin; the first containing row wins. Vectorised via the coarse grid's own
    regular spacing, so it is linear in the number of tiles.
    """
    fine_xy, fine_wh = np.asarray(fine_xy, np.int64), np.asarray(fine_wh, np.int64)
    coarse_xy, coarse_wh = np.asarray(coarse_xy, np.int64), np.asarray(coarse_wh, np.int64)
    out = np.full(len(fine_xy), -1, dtype=np.int64)
    if len(fine_xy) == 0 or len(coarse_xy) == 0:
        return out
    centre = fine_xy * 2 + fine_wh  # doubled, to stay in integers
    lo, hi = coarse_xy * 2, (coarse_xy + coarse_wh) * 2
    # Sort coarse tiles by x so each fine centre only checks candidates whose x-range covers it.
    order = np.argsort(lo[:, 0], kind="stable")
    lo_sorted = lo[order, 0]
    width = int((hi[:, 0] - lo[:, 0]).max())
    start = np.searchsorted(lo_sorted, centre[:, 0] - width, side="left")
    stop = np.searchsorted(lo_sorted, centre[:, 0], side="right")
    for i in range(len(fine_xy)):
        cand = order[start[i]:stop[i]]
        inside = ((lo[cand, 0] <= centre[i, 0]) & (centre[i, 0] < hi[cand, 0])
                  & (lo[cand, 1] <= centre[i, 1]) & (centre[i, 1] < hi[cand, 1]))
        hit = cand[inside]
        if len(hit):
            out[i] = hit.min()
    return out
