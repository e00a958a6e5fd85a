"""Snakemake script of rule `excluded_table`: every slide left out of training -> results/qc/excluded.tsv."""

from slidesnake.bags import stores_by_slide
from slidesnake.exclusion import excluded_table, mode_of
from slidesnake.io import setup_logging, write_table
from slidesnake.samples import read_sheet
from slidesnake.store import open_store

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
samples = read_sheet(sm.input.samples)
# every store checked against its integrity manifest: damaged -> one error, or excluded under skip
stores = {sid: open_store(path, on_bad_slide=mode_of(sm.config)) for sid, path in stores_by_slide(sm.input.stores).items()}
# the magnifications the model reads (common.smk: all of training.magnifications for multiscale models)
mags = [float(m) for m in sm.params.read_magnifications]
table = excluded_table(samples, stores, mags)
write_table(table, sm.output.table)
log.info("%d of %d slides excluded", len(table), len(samples))
for r in table.itertuples(index=False):
    log.info("  %s (%s) at %s: %s", r.slide_id, r.path, r.stage, r.reason)
