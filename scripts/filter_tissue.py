"""Snakemake script of rule `filter_tissue`: tissue mask, per-tile scores and keep flags, QC outputs."""

import json

import pandas as pd

from slidesnake.exclusion import (NO_TISSUE_FIX, excluded_of, log_excluded, mode_of, record,
                                  write_excluded_tissue_outputs)
from slidesnake.io import atomic_path, setup_logging, write_json, write_table
from slidesnake.slide import one_line_errors
from slidesnake.tissue import TissueParams, filter_slide

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
meta = json.loads(open(sm.input.meta).read())
slide_id = meta["slide_id"]
path = sm.input.slide if sm.input.slide else meta["path"]  # no input: missing file, skip mode (common.smk)
# on_bad_slide is read from the config, not a rule param: switching it must not rerun good slides.
mode = mode_of(sm.config)


def exclude(rec):
    write_excluded_tissue_outputs(sm.output, slide_id, path, rec)


if upstream := excluded_of(meta):  # excluded by rule tile: pass the marker on, read nothing
    log_excluded(log, slide_id, path, upstream, upstream=True)
    exclude(upstream)
    raise SystemExit(0)

with one_line_errors(log, mode, "filter_tissue", exclude):
    out = filter_slide(path, meta, pd.read_parquet(sm.input.grid), TissueParams.from_config(sm.params.tissue),
                       thumbnail_size=sm.config["tissue"]["thumbnail_size"], threads=sm.threads, stain=sm.params.stain,
                       logger=log)
    qc = out.qc
    if qc["status"] != "ok":
        log.warning("%s: %s", slide_id, qc["status"])
        if mode == "skip":  # (fail: recorded in qc.json; training skips the empty bag)
            qc["excluded"] = record("filter_tissue", f"{qc['status']}: no tile passed the tissue filter",
                                    NO_TISSUE_FIX.replace("<slide>", slide_id))
            log_excluded(log, slide_id, path, qc["excluded"])
    write_table(out.tiles, sm.output.tiles)
    with atomic_path(sm.output.thumbnail) as tmp:
        out.thumbnail.save(tmp, format="PNG")
    with atomic_path(sm.output.geojson) as tmp:
        tmp.write_text(json.dumps(out.geojson) + "\n")
    write_json(qc, sm.output.qc)
