"""Snakemake script: fold predictions -> summary metrics, OOF predictions, bootstrap CIs, ROC and confusion plots."""

import pandas as pd

from slidesnake.evaluate import bootstrap_ci, plot_confusion, plot_roc, summarize
from slidesnake.io import setup_logging, write_table

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
classes = [str(c) for c in sm.params.classes]
dtypes = {"slide_id": str, "patient_id": str, "label": str, "pred": str}
preds = [pd.read_csv(p, dtype=dtypes) for p in sm.input.predictions]
summary, oof = summarize(preds, classes)
write_table(summary, sm.output.summary)
write_table(oof, sm.output.predictions)
if "n_folds" in oof.columns:  # a fixed test set (splits.test_fraction): every fold's curve and the ensemble's
    plot_roc(preds, classes, sm.output.roc, overall=oof, overall_label="fold ensemble")
else:
    plot_roc(oof, classes, sm.output.roc)
plot_confusion(oof, classes, sm.output.confusion)
ci_path = getattr(sm.output, "summary_ci", None)
if ci_path:
    ev = dict(getattr(sm.params, "evaluation", None) or {})
    ci = bootstrap_ci(oof, classes, n_bootstrap=ev.get("n_bootstrap", 1000), level=ev.get("ci_level", 0.95),
                      seed=ev.get("seed", 0), unit=ev.get("bootstrap_unit", "patient"))
    write_table(ci, ci_path)
    auc = ci.set_index("metric").loc["auc"]
    log.info("pooled OOF AUC %.3f (%g%% CI %.3f-%.3f; %d bootstrap resamples of %d %ss)", auc["estimate"],
             100 * auc["level"], auc["ci_low"], auc["ci_high"], auc["n_valid"], auc["n_units"], auc["unit"])
mean = summary.set_index("fold").loc["mean"]
log.info("%d folds, %d %s: AUC %.3f, balanced accuracy %.3f (mean over folds)", len(preds), len(oof),
         "held-out test slides" if "n_folds" in oof.columns else "OOF slides", mean["auc"], mean["balanced_accuracy"])
