"""Snakemake script: Optuna search of one model's hyperparameters over the folds' train/val splits."""

import logging

import optuna
import pandas as pd
import torch

from slidesnake.io import atomic_path, setup_logging, write_table
from slidesnake.models import get_model_class
from slidesnake.samples import read_sheet
from slidesnake.training import load_bags
from slidesnake.tuning import best_params_yaml, trials_table, tune

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
logging.getLogger("slidesnake.tuning.train").setLevel(logging.WARNING)  # one line per trial, not per epoch
optuna.logging.set_verbosity(optuna.logging.WARNING)
torch.set_num_threads(max(1, int(sm.threads)))
model = sm.params.model
splits = pd.read_csv(sm.input.splits, dtype={"slide_id": str, "patient_id": str, "label": str})
# Only train and val slides are read: tuning never looks at a test split.
wanted = splits.loc[splits["split"].astype(str).isin(["train", "val"]), "slide_id"].unique().tolist()
mag = sm.params.magnification
mag = None if mag is None else float(mag)
bag_type = get_model_class(model).bag_type
mags = [float(m) for m in (getattr(sm.params, "magnifications", None) or [])] or None
samples = read_sheet(sm.input.samples) if bag_type == "hierarchical" else None
bags = load_bags(list(sm.input.features), mag, wanted, log=log, bag_type=bag_type, magnifications=mags,
                 samples=samples)
cfg = dict(sm.params.tuning or {})
base_kwargs = dict(sm.params.model_kwargs or {})
study = tune(bags, splits, list(sm.params.classes), model, base_kwargs, dict(sm.params.training or {}),
             n_trials=cfg.get("n_trials", 20), seed=cfg.get("seed", 0), timeout_s=cfg.get("timeout_s"),
             objective=cfg.get("objective", "val_nll"), log=log)
write_table(trials_table(study), sm.output.study)
with atomic_path(sm.output.best) as tmp:
    tmp.write_text(best_params_yaml(study, model, base_kwargs))
log.info("%s: best trial %d, value %.4f, params %s", model, study.best_trial.number, study.best_value,
         study.best_trial.params)
