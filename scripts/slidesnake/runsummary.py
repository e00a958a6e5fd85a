"""Cohort run summary: which slides went through, which were excluded and why, and time per stage.

Written by the rule ``run_summary`` (part of ``rule all``) to ``results/run_summary/``:

``slides.tsv``
    one row per slide of the sample sheet: ``slide_id, patient_id, label, tiles, tissue_tiles,
    status`` (``included`` / ``excluded``) and ``reason`` (why a slide was excluded; empty otherwise).
    For now a slide is excluded when it has no tissue tile at the training magnification (its bag
    would be empty: training skips it and it gets no prediction).
``stages.tsv``
    one row per stage (rule) from Snakemake's benchmark TSVs: ``stage, jobs, wall_s_total,
    wall_s_mean, wall_s_max, cpu_s_total, max_rss_mb``.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from slidesnake.io import Progress

log = logging.getLogger(__name__)

SLIDE_COLUMNS = ["slide_id", "patient_id", "label", "tiles", "tissue_tiles", "status", "reason"]
STAGE_COLUMNS = ["stage", "jobs", "wall_s_total", "wall_s_mean", "wall_s_max", "cpu_s_total", "max_rss_mb"]


def bag_status(tiles: pd.DataFrame, magnification: float | None) -> tuple[int, int, str]:
    """``(tiles, tissue_tiles, reason)`` of one slide's tissue table at the training magnification; ``reason``
    is empty if its bag is included (the QC status of the slide itself is :func:`slidesnake.tissue.slide_status`)."""
    if magnification is not None and len(tiles):
        tiles = tiles[np.isclose(tiles["magnification"].to_numpy(dtype=float), float(magnification))]
    n, kept = len(tiles), int(tiles["keep"].sum()) if len(tiles) else 0
    at = f" at {float(magnification):g}x" if magnification is not None else ""
    if n == 0:
        return n, kept, f"no tiles{at} (slide smaller than one tile, or magnification not tiled)"
    if kept == 0:
        return n, kept, f"no tissue: none of {n} tiles{at} passed the tissue filter"
    return n, kept, ""


def slide_table(samples: pd.DataFrame, tissue_tables: Mapping[str, str | os.PathLike],
                magnification: float | None, excluded: pd.DataFrame | None = None) -> pd.DataFrame:
    """Status of every slide of ``samples`` from its tissue table (``tiles.parquet``); a slide in
    ``excluded`` (``results/qc/excluded.tsv``) is excluded with that table's stage and reason."""
    marked = {} if excluded is None else {str(r.slide_id): f"{r.stage}: {r.reason}"
                                          for r in excluded.itertuples(index=False)}
    rows = []
    progress = Progress("read tissue tables", len(samples), unit="slides", logger=log)
    for i, row in enumerate(samples.itertuples(index=False), 1):
        sid = str(row.slide_id)
        tiles = pd.read_parquet(tissue_tables[sid], columns=["magnification", "keep"])
        n, kept, reason = bag_status(tiles, magnification)
        reason = marked.get(sid, reason)
        rows.append(dict(slide_id=sid, patient_id=str(row.patient_id), label=str(row.label), tiles=n,
                         tissue_tiles=kept, status="excluded" if reason else "included", reason=reason))
        progress.update(i)
    return pd.DataFrame(rows, columns=SLIDE_COLUMNS)


def read_benchmark(path: str | os.PathLike) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one Snakemake benchmark TSV (mean of repeats)."""
    b = pd.read_csv(path, sep="\t")

    def col(name: str) -> float:
        if name not in b.columns or b.empty:
            return float("nan")
        return float(pd.to_numeric(b[name], errors="coerce").mean())

    return {"s": col("s"), "cpu_time": col("cpu_time"), "max_rss": col("max_rss")}


def stage_table(benchmarks: Mapping[str, Sequence[str | os.PathLike]]) -> pd.DataFrame:
    """Time per stage: ``benchmarks`` maps a stage (rule) name to its jobs' benchmark TSVs."""
    rows = []
    for stage, paths in benchmarks.items():
        if not paths:
            continue
        b = pd.DataFrame([read_benchmark(p) for p in paths])
        rows.append(dict(stage=stage, jobs=len(b), wall_s_total=round(b["s"].sum(), 2),
                         wall_s_mean=round(b["s"].mean(), 2), wall_s_max=round(b["s"].max(), 2),
                         cpu_s_total=round(b["cpu_time"].sum(), 2),
                         max_rss_mb=round(b["max_rss"].max(), 1)))
    return pd.DataFrame(rows, columns=STAGE_COLUMNS)


def log_summary(slides: pd.DataFrame, stages: pd.DataFrame) -> None:
    excluded = slides[slides["status"] == "excluded"]
    log.info("%d slides in the sheet: %d included, %d excluded", len(slides), len(slides) - len(excluded),
             len(excluded))
    for reason, n in excluded["reason"].str.split(":").str[0].value_counts().items():
        log.info("  excluded (%s): %d", reason, n)
    for r in stages.itertuples(index=False):
        log.info("stage %-18s %5d jobs, %9.1f s in all (mean %.1f s, max %.1f s), peak RSS %.0f MB",
                 r.stage, r.jobs, r.wall_s_total, r.wall_s_mean, r.wall_s_max, r.max_rss_mb)
