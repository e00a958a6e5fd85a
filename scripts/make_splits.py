"""Snakemake script: sample sheet -> patient-level stratified folds (splits.csv)."""

from slidesnake.io import setup_logging, write_table
from slidesnake.samples import read_sheet
from slidesnake.splits import make_splits

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
samples = read_sheet(sm.input.samples)
splits = make_splits(samples, k=int(sm.params.k), seed=int(sm.params.seed), classes=list(sm.params.classes),
                     test_fraction=float(getattr(sm.params, "test_fraction", 0) or 0),
                     site_preserved=bool(getattr(sm.params, "site_preserved", False)))
write_table(splits, sm.output.splits)
log.info("wrote %d folds of %d slides to %s", splits["fold"].nunique(), splits["slide_id"].nunique(),
         sm.output.splits)
