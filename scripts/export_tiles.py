"""Snakemake script of rule `export_tiles`: kept tiles as image files in CMA-MIL's layout,
``patches_<mag>x/<label>/<slide_id>/<col>_<row>.<format>`` (one output directory per magnification)."""

import functools
import json

import pandas as pd

from slidesnake.exclusion import excluded_of, log_excluded
from slidesnake.io import atomic_path, setup_logging
from slidesnake.slide import one_line_errors
from slidesnake.tiling import TileReader, export_tile, mag_label, map_tiles

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
meta = json.loads(open(sm.input.meta).read())
slide_id, p = meta["slide_id"], sm.params
tiles = pd.read_parquet(sm.input.tiles)
if upstream := excluded_of(meta):  # excluded (on_bad_slide: skip): empty tile directories
    log_excluded(log, slide_id, meta.get("path"), upstream, upstream=True)
    for out in sm.output:
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
    raise SystemExit(0)
kept = tiles[tiles["keep"]]
reader = TileReader(sm.input.slide, meta["tile_size"], meta["overlap"], meta["limit_bounds"], slide_id=slide_id)

with one_line_errors(log):
    for mag, out in zip(p.magnifications, sm.output):
        rows = kept[kept["magnification"] == mag]
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            fn = functools.partial(export_tile, directory=str(tmp), fmt=p.format, quality=p.quality)
            map_tiles(fn, rows, reader, sm.threads, what=f"exported {mag_label(mag)}")
        log.info("%s: %d tiles at %s -> %s", slide_id, len(rows), mag_label(mag), out)
