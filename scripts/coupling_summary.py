"""Snakemake script of rule coupling_summary: AUC and localisation per coupling round."""

import os

import pandas as pd

from slidesnake.coupling_rounds import oof_localisation, round_summary
from slidesnake.io import setup_logging, write_table

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
classes = [str(c) for c in sm.params.classes]
dtypes = {"slide_id": str, "patient_id": str, "label": str, "pred": str}
rounds, folds = int(sm.params.rounds), [int(k) for k in sm.params.folds]
paths = list(sm.input.predictions)  # round-major, fold-minor
preds = {r: [pd.read_csv(paths[r * len(folds) + i], dtype=dtypes) for i in range(len(folds))]
         for r in range(rounds + 1)}
loc = {}
if sm.params.annotations:
    models = list(sm.input.models)
    stores = sm.params.stores  # {round: {fold: {slide: store}}}
    for r in range(rounds + 1):
        test = {k: p.loc[p["split"] == "test", "slide_id"].tolist() for k, p in zip(folds, preds[r])}
        labels = {s: l for p in preds[r] for s, l in zip(p["slide_id"], p["label"])}
        loc[r] = oof_localisation({k: stores[str(r)][str(k)] for k in folds},
                                  {k: models[r * len(folds) + i] for i, k in enumerate(folds)}, test, labels,
                                  sm.params.annotations, float(sm.params.magnification), classes[1:])
table = round_summary(preds, classes, loc)
for row in table.itertuples():
    log.info("round %d: AUC %.4f (sd %.4f), localisation AUC %.4f", row.round, row.auc_mean, row.auc_sd,
             row.localisation_auc)
write_table(table, sm.output.csv)
