"""Snakemake script: features of one slide's kept tiles -> results/features/<backbone>/<slide_id>.zarr.

The work is slidesnake.features.extract_job, run in this process or -- config
features.shared_process -- in the bundle's feature server (slidesnake.featserver), which sets the
backbone up once for all the slides of a bundle. Either way this job keeps its own log, benchmark
and output.
"""

import json
from pathlib import Path

from slidesnake import featserver
from slidesnake.exclusion import excluded_of, log_excluded, mode_of
from slidesnake.io import setup_logging
from slidesnake.errors import one_line_errors
from slidesnake.stainnorm import load_normaliser
from slidesnake.store import write_excluded_store

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
meta = json.loads(Path(sm.input.meta).read_text())
qc = json.loads(Path(sm.input.qc).read_text())
slide_id = meta["slide_id"]
path = sm.input.slide if sm.input.slide else meta["path"]  # no input: missing file, skip mode
# on_bad_slide, shared_process and stage_dir are read from the config, not rule params: switching
# them must not rerun good slides.
mode = mode_of(sm.config)
features_cfg = sm.config.get("features", {})


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

job = dict(
    slide=sm.input.slide, tiles=sm.input.tiles, out=sm.output.store, slide_id=slide_id, mode=mode,
    stage_dir=features_cfg.get("stage_dir"),
    backbone=sm.params.backbone,
    weights=sm.params.weights,
    tile_size=meta["tile_size"],
    overlap=meta["overlap"],
    limit_bounds=meta["limit_bounds"],
    # run-shaping settings: from the config, not rule params (changing them reruns nothing)
    batch_size=features_cfg["batch_size"],
    num_workers=features_cfg["num_workers"],
    device=features_cfg["device"],
    feature_dtype=sm.params.feature_dtype,
    compile=features_cfg["compile"],
    # the weights pin is read from the config, not a param: adding one must not rerun extraction
    backbone_options={**(getattr(sm.params, "backbone_options", None) or {}),
                      "weights_sha256": features_cfg.get("weights_sha256")},
    threads=sm.threads,
    # optional stain normalisation (features.stain_normalisation, slidesnake.stainnorm)
    tile_transform=load_normaliser(stain_reference),
    reader=meta.get("reader", "auto"),
    extra_attrs={"mpp": meta["mpp"], "mpp_source": meta.get("mpp_source"),
                 "objective_power": meta["objective_power"],
                 "objective_source": meta.get("objective_source")},
)
with one_line_errors(log, mode, "extract_features", exclude):
    if featserver.enabled(features_cfg.get("shared_process", "auto")):
        summary = featserver.extract(job, log_path=sm.log[0])
    else:
        from slidesnake.features import extract_job

        summary = extract_job(**job)
    log.info("summary: %s", json.dumps(summary))
