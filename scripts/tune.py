"""Snakemake script of rule `tune`: Optuna search of one model's hyperparameters over the folds'
train/val splits (slidesnake.stages.tune_job)."""

import logging

import optuna
import torch

from slidesnake.exclusion import mode_of
from slidesnake.io import setup_logging
from slidesnake.stages import tune_job

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
logging.getLogger("slidesnake.tuning.train").setLevel(logging.WARNING)  # one line per trial, not per epoch
optuna.logging.set_verbosity(optuna.logging.WARNING)
torch.set_num_threads(max(1, int(sm.threads)))
tune_job(features=list(sm.input.features), splits=sm.input.splits, samples=sm.input.samples,
         classes=list(sm.params.classes), model=sm.params.model, model_kwargs=sm.params.model_kwargs,
         training={**dict(sm.params.training or {}), "device": sm.config["training"]["device"]},  # run-shaping
         tuning=sm.params.tuning, magnification=sm.params.magnification,
         magnifications=getattr(sm.params, "magnifications", None), out_study=sm.output.study,
         out_best=sm.output.best, log=log, on_bad_slide=mode_of(sm.config))
