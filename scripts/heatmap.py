"""Snakemake script of rules `heatmap` (out-of-fold attention of one slide over its thumbnail) and
`predict_heatmap` (a new slide: no splits input, the fold ensemble's attention):
slidesnake.heatmap_stage.heatmap_job."""

from slidesnake.exclusion import mode_of
from slidesnake.io import setup_logging
from slidesnake.heatmap_stage import HeatmapOutputs, HeatmapSettings, heatmap_job

sm = snakemake  # noqa: F821
p = sm.params
scale, uniform_range = p.scale  # config heatmap.scale, heatmap.uniform_range
heatmap_job(
    slide=sm.input.slide, store=sm.input.store, models=list(p.models), slide_id=sm.wildcards.slide,
    splits=getattr(sm.input, "splits", None),  # rule predict_heatmap has none: a new slide, in no fold
    samples=sm.input.samples, case_stores=list(sm.input.case_stores),
    settings=HeatmapSettings(
        magnification=p.magnification, magnifications=p.magnifications, thumbnail_size=p.thumbnail_size,
        alpha=p.alpha, cmap=p.cmap, percentiles=tuple(p.percentiles), scale=scale, uniform_range=uniform_range,
        smooth_sigma=p.smooth_sigma, top_k=p.top_k, patch_predictions=bool(p.patch_predictions)),
    outputs=HeatmapOutputs(png=sm.output.png, tiles=sm.output.tiles, geojson=sm.output.geojson,
                           top_tiles=sm.output.top_tiles),
    log=setup_logging(sm.log[0]), on_bad_slide=mode_of(sm.config))
