"""Snakemake script of rule `filter_tissue`: tissue mask, per-tile scores and keep flags, QC outputs."""

import json

import cv2
import pandas as pd
from PIL import Image

from slidesnake.exclusion import (NO_TISSUE_FIX, excluded_of, log_excluded, mode_of, record,
                                  write_excluded_tissue_outputs)
from slidesnake.io import atomic_path, setup_logging, write_json, write_table
from slidesnake.slide import one_line_errors, open_slide
from slidesnake.tiling import TileReader
from slidesnake.tissue import (TissueParams, filter_tiles, mask_geojson, qc_summary, qc_thumbnail,
                               read_overview, tissue_mask)

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
    params = TissueParams.from_config(sm.params.tissue)
    slide = open_slide(path, slide_id)
    # The mask is always made (contours and tissue area are QC outputs); it decides tiles only
    # when 'otsu' is one of the methods.
    overview = read_overview(slide, params.otsu.mask_mpp / meta["mpp"], slide_id=slide_id, path=path)
    mask = tissue_mask(overview, meta["mpp"], params.otsu)
    log.info("%s: tissue mask %dx%d px at %.1f um/px, Otsu threshold %.0f (used %.0f), tissue %.2f mm2",
             slide_id, mask.mask.shape[1], mask.mask.shape[0], params.otsu.mask_mpp, mask.otsu,
             mask.threshold, mask.area_mm2)
    # QC thumbnail: from the mask's overview when that is fine enough, else read at its own size;
    # the overview is dropped before tile-reading workers are forked.
    size = sm.config["tissue"]["thumbnail_size"]  # run-shaping: not a rule param (no reruns)
    ds = max(slide.dimensions) / size
    if max(overview.rgb.shape[:2]) >= size:
        w, h = max(1, round(slide.dimensions[0] / ds)), max(1, round(slide.dimensions[1] / ds))
        thumb = Image.fromarray(cv2.resize(overview.rgb, (w, h), interpolation=cv2.INTER_AREA))
    else:
        thumb = Image.fromarray(read_overview(slide, ds, slide_id=slide_id, path=path).rgb)
    del overview

    grid = pd.read_parquet(sm.input.grid)
    reader = TileReader(path, meta["tile_size"], meta["overlap"], meta["limit_bounds"], slide_id=slide_id)
    tiles = filter_tiles(grid, reader, params, mask=mask, threads=sm.threads)
    qc = qc_summary(meta, tiles, params, mask)
    for mag, c in qc["magnifications"].items():
        log.info("%sx: kept %d of %d tiles (%d tissue by %s (%s), %d of them rejected as artefacts)",
                 mag, c["kept"], c["tiles"], c["tissue"], "+".join(params.methods), params.combine,
                 c["artefact"])
    if qc["status"] != "ok":
        log.warning("%s: %s", slide_id, qc["status"])
        if mode == "skip":  # (fail: recorded in qc.json; training skips the empty bag)
            qc["excluded"] = record("filter_tissue", f"{qc['status']}: no tile passed the tissue filter",
                                    NO_TISSUE_FIX.replace("<slide>", slide_id))
            log_excluded(log, slide_id, path, qc["excluded"])

    image = qc_thumbnail(thumb, tiles, size, slide_dimensions=slide.dimensions, mask=mask)

    write_table(tiles, sm.output.tiles)
    with atomic_path(sm.output.thumbnail) as tmp:
        image.save(tmp, format="PNG")
    with atomic_path(sm.output.geojson) as tmp:
        tmp.write_text(json.dumps(mask_geojson(mask)) + "\n")
    write_json(qc, sm.output.qc)
