"""Snakemake script of rule `stain_reference`: the reference stain normalisation fits tiles to
(features.stain_normalisation; slidesnake.stainnorm) -> results/features/stain_reference.json."""

import json

from slidesnake.io import setup_logging, write_json
from slidesnake.slide import one_line_errors
from slidesnake.stainnorm import cohort_reference, fit_reference, slide_tissue_pixels

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
cfg = sm.params.stain_normalisation
with one_line_errors(log, also=(ValueError,)):
    if cfg["reference"] == "cohort":
        ref = cohort_reference([json.loads(open(p).read()) for p in sm.input.qc])
    else:
        meta = json.loads(open(sm.input.meta).read())
        pixels = slide_tissue_pixels(sm.input.slide, meta["slide_id"], meta["mpp"], meta.get("reader", "auto"))
        ref = fit_reference(cfg["method"], pixels, f"slide {meta['slide_id']}")
    log.info("stain reference (%s): %s", cfg["method"], ref["reference"])
    write_json(ref, sm.output.reference)
