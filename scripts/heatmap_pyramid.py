"""Snakemake script of rule `heatmap_pyramid`: a slide's tile attention as a pyramidal TIFF on its level-0 grid."""

import json

import pandas as pd

from slidesnake.exclusion import excluded_of, log_excluded
from slidesnake.heatmap import write_heatmap_slide
from slidesnake.io import setup_logging

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
slide_id = sm.wildcards.slide
# The slide's level-0 size, MPP and objective as rule tile resolved them (sheet override included);
# the slide itself is not opened.
meta = json.loads(open(sm.input.meta).read())
tiles = pd.read_csv(sm.input.tiles, dtype={"slide_id": str})
if rec := excluded_of(meta):  # on_bad_slide: skip -- no size to draw on: a blank placeholder
    log_excluded(log, slide_id, meta.get("path", "-"), rec, upstream=True)
    write_heatmap_slide(sm.output.tiff, tiles.iloc[:0], (256, 256), cmap=sm.params.cmap)
    log.info("%s: excluded; wrote a blank 256 x 256 placeholder %s", slide_id, sm.output.tiff)
else:
    write_heatmap_slide(sm.output.tiff, tiles, tuple(meta["dimensions"]), cmap=sm.params.cmap,
                        mpp=float(meta["mpp"]), objective=float(meta["objective_power"]))
    log.info("%s: %d tiles -> %s", slide_id, len(tiles), sm.output.tiff)
