"""Snakemake script: train one fold of a MIL model on the Zarr feature stores."""

import pandas as pd
import torch

from slidesnake.io import setup_logging, write_table
from slidesnake.models import get_model_class
from slidesnake.bags import NonFiniteError
from slidesnake.samples import read_sheet
from slidesnake.errors import one_line_errors
from slidesnake.training import load_bags, save_checkpoint, train_fold

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
torch.set_num_threads(max(1, int(sm.threads)))
fold = int(sm.params.fold)
splits = pd.read_csv(sm.input.splits, dtype={"slide_id": str, "patient_id": str, "label": str})
rows = splits[splits["fold"] == fold]
if rows.empty:
    raise ValueError(f"fold {fold} not in {sm.input.splits} (folds {sorted(splits['fold'].unique())})")
mag = sm.params.magnification
mag = None if mag is None else float(mag)
# The model's bag_type says what to build: one magnification per slide (flat), every magnification of
# training.magnifications with parent links (multiscale), or a patient's slides by stain (hierarchical).
bag_type = get_model_class(sm.params.model).bag_type
mags = [float(m) for m in (getattr(sm.params, "magnifications", None) or [])] or None
samples = read_sheet(sm.input.samples) if bag_type == "hierarchical" else None
# Excluded slides and empty bags are left out (logged with the reason); NaN / Inf features or a
# non-finite loss stop the job with one line naming the slide (and fold and epoch).
with one_line_errors(log, also=(NonFiniteError,)):
    bags = load_bags(list(sm.input.features), mag, rows["slide_id"].tolist(), log=log, bag_type=bag_type,
                     magnifications=mags, samples=samples)
    result = train_fold(bags, rows, list(sm.params.classes), sm.params.model, dict(sm.params.model_kwargs or {}),
                        log=log, tensorboard=getattr(sm.params, "tensorboard", "") or None,
                        **dict(sm.params.training or {}))
save_checkpoint(sm.output.model, result, {"magnification": mag, "bag_type": bag_type,
                                          "magnifications": mags if bag_type == "multiscale" else None})
write_table(result.history, sm.output.history)
write_table(result.predictions, sm.output.predictions)
log.info("fold %d: best epoch %d; wrote %s", fold, result.best_epoch, sm.output.model)
