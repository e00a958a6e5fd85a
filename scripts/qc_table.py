"""Snakemake script of rule `qc_table`: the cohort QC table (one row per slide, from each qc.json)
and the cohort audit (results/qc/cohort.tsv and cohort.html: slidesnake.audit)."""

import json

import pandas as pd

from slidesnake.audit import audit_html, cohort_audit
from slidesnake.io import atomic_path, setup_logging, write_table
from slidesnake.tissue import qc_table

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
records = [json.loads(open(p).read()) for p in sm.input.qc]
table = qc_table(records)
for status, n in table["status"].value_counts().items():
    log.info("%d slide(s): %s", n, status)
audit = cohort_audit(records, pd.DataFrame(sm.params.sheet))
for flag, n in audit["flags"].str.split(",").explode().value_counts().items():
    if flag:
        log.warning("cohort audit: %d slide(s) flagged %s", n, flag)
write_table(table, sm.output.table)
write_table(audit, sm.output.audit)
with atomic_path(sm.output.html) as tmp:
    tmp.write_text(audit_html(audit))
