"""Snakemake script of rule `qc_table`: the cohort QC table, one row per slide, from each qc.json."""

import json

from slidesnake.io import setup_logging, write_table
from slidesnake.tissue import qc_table

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
table = qc_table([json.loads(open(p).read()) for p in sm.input.qc])
for status, n in table["status"].value_counts().items():
    log.info("%d slide(s): %s", n, status)
write_table(table, sm.output.table)
