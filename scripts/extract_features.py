"""Snakemake script: features of one slide's kept tiles -> results/features/<backbone>/<slide_id>.zarr."""

import json
from pathlib import Path

import pandas as pd

from slidesnake.features import extract_slide
from slidesnake.io import setup_logging

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
meta = json.loads(Path(sm.input.meta).read_text())
tiles = pd.read_parquet(sm.input.tiles)

summary = extract_slide(
    sm.input.slide, tiles, sm.output.store,
    slide_id=meta["slide_id"],
    backbone=sm.params.backbone,
    weights=sm.params.weights,
    tile_size=meta["tile_size"],
    overlap=meta["overlap"],
    limit_bounds=meta["limit_bounds"],
    batch_size=sm.params.batch_size,
    num_workers=sm.params.num_workers,
    device=sm.params.device,
    feature_dtype=sm.params.feature_dtype,
    compile=getattr(sm.params, "compile", False),
    threads=sm.threads,
    extra_attrs={"mpp": meta["mpp"], "mpp_source": meta.get("mpp_source"),
                 "objective_power": meta["objective_power"],
                 "objective_source": meta.get("objective_source")},
)
log.info("summary: %s", json.dumps(summary))
