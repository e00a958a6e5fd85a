"""Snakemake script: per-fold predictions -> summary metrics, OOF predictions, ROC and confusion plots."""

import pandas as pd

from slidesnake.evaluate import plot_confusion, plot_roc, summarize
from slidesnake.io import setup_logging, write_table

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
classes = [str(c) for c in sm.params.classes]
dtypes = {"slide_id": str, "patient_id": str, "label": str, "pred": str}
preds = [pd.read_csv(p, dtype=dtypes) for p in sm.input.predictions]
summary, oof = summarize(preds, classes)
write_table(summary, sm.output.summary)
write_table(oof, sm.output.predictions)
plot_roc(oof, classes, sm.output.roc)
plot_confusion(oof, classes, sm.output.confusion)
mean = summary.set_index("fold").loc["mean"]
log.info("%d folds, %d OOF slides: AUC %.3f, balanced accuracy %.3f", len(preds), len(oof), mean["auc"],
         mean["balanced_accuracy"])
