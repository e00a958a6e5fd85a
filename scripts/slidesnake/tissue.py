"""Tissue filtering: per-tile scores, a keep mask, and the QC thumbnail."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from slidesnake.tiling import TileReader

log = logging.getLogger(__name__)


def edge_density(tile: np.ndarray) -> float:
    """CMA-MIL's edge density: mean over RGB of the summed ``FIND_EDGES`` response per pixel.

    Blank glass scores near 0, tissue well above the default threshold of 15.
    """
    edges = np.asarray(Image.fromarray(tile).filter(ImageFilter.FIND_EDGES), dtype=np.float64)
    return float(edges.sum(axis=(0, 1)).mean() / (tile.shape[0] * tile.shape[1]))


_READER: TileReader | None = None


def _init_worker(reader: TileReader) -> None:
    global _READER
    _READER = reader


def _score_chunk(rows: np.ndarray) -> np.ndarray:
    return np.array([edge_density(_READER.read(*r)) for r in rows], dtype=np.float32)


def _map_chunks(chunks, reader: TileReader, threads: int):
    if threads <= 1 or len(chunks) == 1:
        _init_worker(reader)
        yield from map(_score_chunk, chunks)
        return
    # fork where there is one: spawn re-imports the parent's __main__, which for a Snakemake
    # script is the whole script (it would run again in every worker).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(threads, initializer=_init_worker, initargs=(reader,)) as pool:
        yield from pool.imap(_score_chunk, chunks)


def score_tiles(grid: pd.DataFrame, reader: TileReader, threads: int = 1, chunk: int = 64) -> np.ndarray:
    """Edge density of every tile of ``grid``, read in ``threads`` worker processes."""
    rows = grid[["dz_tile_size", "dz_level", "col", "row"]].to_numpy()
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    t0, done, out = time.monotonic(), 0, []
    step = max(1, len(chunks) // 10)
    for i, scores in enumerate(_map_chunks(chunks, reader, threads)):
        out.append(scores)
        done += len(scores)
        if (i + 1) % step == 0 or done == len(rows):
            log.info("scored %d/%d tiles (%.0f tiles/s)", done, len(rows), done / (time.monotonic() - t0))
    return np.concatenate(out)


def filter_tiles(grid: pd.DataFrame, reader: TileReader, *, edge_threshold: float = 15.0,
                 threads: int = 1) -> pd.DataFrame:
    """The grid with ``edge_score`` and ``keep`` columns."""
    out = grid.copy()
    out["edge_score"] = score_tiles(grid, reader, threads=threads)
    out["keep"] = out["edge_score"] > edge_threshold
    return out


def qc_thumbnail(slide, tiles: pd.DataFrame, max_size: int = 1024) -> Image.Image:
    """Slide thumbnail with kept tiles outlined in green (one panel per magnification, side by side)."""
    thumb = slide.get_thumbnail((max_size, max_size)).convert("RGB")
    scale = thumb.size[0] / slide.dimensions[0]
    mags = sorted(tiles["magnification"].unique(), reverse=True) or [None]
    panels = []
    for mag in mags:
        panel = thumb.copy()
        draw = ImageDraw.Draw(panel)
        sel = tiles[(tiles["magnification"] == mag) & tiles["keep"]] if mag is not None else tiles[:0]
        for x, y, w, h in sel[["x", "y", "w", "h"]].to_numpy():
            draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1],
                           outline=(0, 170, 0))
        if mag is not None:
            draw.text((5, 5), f"{mag:g}x: {len(sel)} tissue tiles", fill=(0, 0, 0))
        panels.append(panel)
    out = Image.new("RGB", (sum(p.size[0] for p in panels), thumb.size[1]), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.size[0]
    return out
