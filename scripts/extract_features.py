"""Snakemake script: features of one slide's kept tiles -> results/features/<backbone>/<slide_id>.zarr."""

import json
from pathlib import Path

import pandas as pd

from slidesnake.exclusion import NO_TISSUE_FIX, excluded_of, log_excluded, mode_of
from slidesnake.features import extract_slide
from slidesnake.io import setup_logging
from slidesnake.slide import SlideError, one_line_errors
from slidesnake.stainnorm import load_normaliser
from slidesnake.store import write_excluded_store

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
meta = json.loads(Path(sm.input.meta).read_text())
qc = json.loads(Path(sm.input.qc).read_text())
slide_id = meta["slide_id"]
path = sm.input.slide if sm.input.slide else meta["path"]  # no input: missing file, skip mode
# on_bad_slide is read from the config, not a rule param: switching it must not rerun good slides.
mode = mode_of(sm.config)


def exclude(rec):
    write_excluded_store(sm.output.store, slide_id, rec, {"backbone": sm.params.backbone, "path": str(path)})


upstream = excluded_of(meta) or excluded_of(qc)
if upstream:  # excluded at tile or filter_tissue: pass the marker on, read nothing
    log_excluded(log, slide_id, path, upstream, upstream=True)
    exclude(upstream)
    raise SystemExit(0)

# features/stain_reference.json when features.stain_normalisation is on (one file: a str; none: empty)
stain_reference = getattr(sm.input, "stain_reference", [])
stain_reference = stain_reference if isinstance(stain_reference, str) else next(iter(stain_reference), None)

with one_line_errors(log, mode, "extract_features", exclude):
    tiles = pd.read_parquet(sm.input.tiles)
    if mode == "skip" and not tiles["keep"].any():  # (fail: an empty store; training skips the empty bag)
        raise SlideError(slide_id, path, "no kept tile at any magnification",
                         NO_TISSUE_FIX.replace("<slide>", slide_id))
    summary = extract_slide(
        sm.input.slide, tiles, sm.output.store,
        slide_id=slide_id,
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
        # optional stain normalisation (features.stain_normalisation, slidesnake.stainnorm)
        tile_transform=load_normaliser(stain_reference),
        reader=meta.get("reader", "auto"),
        extra_attrs={"mpp": meta["mpp"], "mpp_source": meta.get("mpp_source"),
                     "objective_power": meta["objective_power"],
                     "objective_source": meta.get("objective_source")},
    )
    log.info("summary: %s", json.dumps(summary))
