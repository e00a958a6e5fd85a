"""Snakemake script of rule `localisation`: tile attention vs annotated regions, per slide and cohort mean."""

import os

import pandas as pd

from slidesnake.heatmap import localisation_table
from slidesnake.io import setup_logging, write_table
from slidesnake.samples import read_sheet

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
sheet = read_sheet(sm.input.samples)
labels = dict(zip(sheet["slide_id"].astype(str), sheet["label"].astype(str)))
entries = []
for path in sm.input.tiles:
    slide_id = os.path.basename(path)[: -len(".tiles.csv")]
    gj = os.path.join(sm.params.annotations, f"{slide_id}.geojson")
    entries.append((slide_id, labels.get(slide_id, ""), pd.read_csv(path, dtype={"slide_id": str}),
                    gj if os.path.exists(gj) else None))
table = localisation_table(entries)
log.info("localisation AUC: cohort mean %.4f over %d slides with regions", table["auc"].iloc[-1],
         int(table["auc"].iloc[:-1].notna().sum()))
write_table(table, sm.output.csv)
