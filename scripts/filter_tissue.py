"""Snakemake script of rule `filter_tissue`: per-tile tissue scores, keep flags and a QC thumbnail."""

import json

import pandas as pd

from slidesnake.io import atomic_path, setup_logging, write_table
from slidesnake.slide import open_slide
from slidesnake.tiling import TileReader
from slidesnake.tissue import filter_tiles, qc_thumbnail

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
meta = json.loads(open(sm.input.meta).read())
grid = pd.read_parquet(sm.input.grid)
reader = TileReader(sm.input.slide, meta["tile_size"], meta["overlap"], meta["limit_bounds"])
tiles = filter_tiles(grid, reader, edge_threshold=sm.params.edge_threshold, threads=sm.threads)
for mag, g in tiles.groupby("magnification"):
    log.info("%gx: kept %d of %d tiles (edge density > %g)", mag, g["keep"].sum(), len(g),
             sm.params.edge_threshold)
write_table(tiles, sm.output.tiles)
thumb = qc_thumbnail(open_slide(sm.input.slide, meta["slide_id"]), tiles, sm.params.thumbnail_size)
with atomic_path(sm.output.thumbnail) as tmp:
    thumb.save(tmp, format="PNG")
