"""Snakemake script: sample sheet minus excluded slides -> patient-level stratified folds (splits.csv)."""

import pandas as pd

from slidesnake.config import check_splittable
from slidesnake.io import setup_logging, write_table
from slidesnake.samples import read_sheet
from slidesnake.splits import make_splits

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
samples = read_sheet(sm.input.samples)
# Slides left out of training (results/qc/excluded.tsv) hold no place in the folds.
excluded = getattr(sm.input, "excluded", None)
if excluded:
    table = pd.read_csv(excluded, sep="\t", dtype=str)
    drop = samples["slide_id"].isin(set(table["slide_id"]))
    for r in table.itertuples(index=False):
        log.info("not in the folds: %s (excluded at %s: %s)", r.slide_id, r.stage, r.reason)
    samples = samples[~drop]
    check_splittable(samples, list(sm.params.classes), int(sm.params.k), float(sm.params.test_fraction or 0),
                     after=f" after leaving out the {int(drop.sum())} slide(s) of {excluded}")
splits = make_splits(samples, k=int(sm.params.k), seed=int(sm.params.seed), classes=list(sm.params.classes),
                     test_fraction=float(getattr(sm.params, "test_fraction", 0) or 0),
                     site_preserved=bool(getattr(sm.params, "site_preserved", False)))
write_table(splits, sm.output.splits)
log.info("wrote %d folds of %d slides to %s", splits["fold"].nunique(), splits["slide_id"].nunique(),
         sm.output.splits)
