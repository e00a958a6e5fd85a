"""Snakemake script of rule `heatmap_pyramid`: a slide's tile attention as a pyramidal TIFF on its level-0 grid."""

import pandas as pd

from slidesnake.heatmap import write_heatmap_slide
from slidesnake.io import setup_logging
from slidesnake.slide import SlideError, open_slide, resolve_resolution

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
slide_id = sm.wildcards.slide
slide = open_slide(sm.input.slide, slide_id)
tiles = pd.read_csv(sm.input.tiles, dtype={"slide_id": str})
try:
    res = resolve_resolution(slide.properties, slide_id, sm.input.slide)
    mpp, objective = res.mpp, res.objective_power
except SlideError as err:  # the pixel size is only metadata of the overlay
    log.warning("%s: no resolution (%s); writing MPP 0.5", slide_id, err)
    mpp, objective = 0.5, 20.0
write_heatmap_slide(sm.output.tiff, tiles, slide.dimensions, cmap=sm.params.cmap, mpp=mpp, objective=objective)
log.info("%s: %d tiles -> %s", slide_id, len(tiles), sm.output.tiff)
