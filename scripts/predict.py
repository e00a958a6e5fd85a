"""Snakemake script of rule `predict`: fold-ensemble predictions of new slides, and the models used."""

import pandas as pd
import torch

from slidesnake.exclusion import mode_of
from slidesnake.io import setup_logging, write_table
from slidesnake.predict import MODEL_COLUMNS, ensemble_predictions, predict_sheet_bags
from slidesnake.samples import read_predict_sheet
from slidesnake.training import load_checkpoint

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
torch.set_num_threads(max(1, int(sm.threads)))
models = list(sm.params.models)
sheet = read_predict_sheet(sm.input.samples)
# The bags the checkpoints read (bag type and magnifications from the checkpoint, as trained).
_, ckpt = load_checkpoint(models[0])  # checked against its sha256 sidecar first
bags = predict_sheet_bags(list(sm.input.stores), sheet, ckpt, log=log, on_bad_slide=mode_of(sm.config))
pred = ensemble_predictions(models, bags, log=log)
record = pd.DataFrame(pred.attrs["models"], columns=MODEL_COLUMNS)
changed = [p for p, h, want in zip(record["path"], record["sha256"], sm.params.sha256) if h != want]
if changed:
    raise RuntimeError(f"model {changed[0]} changed while the workflow ran (sha256 differs from the plan's); "
                       "run snakemake predict again")
if ckpt.get("bag_type") != "hierarchical":  # one row per slide: add its patient
    pred.insert(1, "patient_id", pred["slide_id"].map(dict(zip(sheet["slide_id"], sheet["patient_id"]))))
write_table(pred, sm.output.predictions)
write_table(record, sm.output.models)
log.info("%d predictions (%s) with %d fold models -> %s", len(pred), pred["pred"].value_counts().to_dict(),
         len(models), sm.output.predictions)
