"""Optional hyperparameter search with Optuna (the ``tune`` rule; never part of ``all``).

Each trial draws ``lr`` and ``weight_decay`` (log-uniform), ``dropout`` (when the model takes one)
and the model's own knobs (``search_space(trial)``, a classmethod next to each model), then, for
every fold, trains on the fold's ``train`` split with early stopping on its ``val`` split
(:func:`slidesnake.training.train_fold`) and scores the early-stopped model on ``val``. The trial's
value is the mean over folds. **Test splits are dropped before training**: no test slide is read,
trained on or scored.

Objectives: ``val_nll`` (default) is the mean negative log-likelihood of the val slides' labels
under the early-stopped model, i.e. the plain bag cross-entropy; it stays comparable between
trials that weight auxiliary loss terms differently (CLAM's ``bag_weight``, DA-MIL's ``lambda_*``).
``val_loss`` is the model's own best validation loss (``total``, auxiliary terms included), the
quantity early stopping minimises.

    >>> study = tune(bags, splits, ["normal", "tumour"], "clam", n_trials=20, seed=0)
    >>> best_config(study, "clam")  # {"training": {"model": "clam", "lr": ..., "model_kwargs": {...}}}
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from slidesnake.models import get_model_class
from slidesnake.training import train_fold

_log = logging.getLogger("slidesnake.tuning")
OBJECTIVES = ("val_nll", "val_loss")
LR_RANGE = (1e-5, 1e-3)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
DROPOUT_RANGE = (0.0, 0.5)
TRAINING_PARAMS = ("lr", "weight_decay")


def suggest(trial, model_name: str, model_kwargs: Mapping | None = None) -> tuple[dict, dict]:
    """Draw one trial's training overrides (lr, weight_decay) and model kwargs.

    ``model_kwargs`` are the fixed base options; searched knobs override them.
    """
    cls = get_model_class(model_name)
    training = {
        "lr": trial.suggest_float("lr", *LR_RANGE, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True),
    }
    kwargs = dict(model_kwargs or {})
    if "dropout" in inspect.signature(cls.__init__).parameters:
        kwargs["dropout"] = trial.suggest_float("dropout", *DROPOUT_RANGE)
    space = getattr(cls, "search_space", None)
    if space is not None:
        kwargs.update(space(trial))
    return training, kwargs


def val_nll(predictions: pd.DataFrame, classes: Sequence[str]) -> float:
    """Mean negative log-likelihood of the labels of the ``val`` rows of a fold's predictions."""
    val = predictions[predictions["split"].astype(str) == "val"]
    if val.empty:
        return float("nan")
    probs = val[[f"prob_{c}" for c in classes]].to_numpy(float)
    idx = val["label"].astype(str).map({str(c): i for i, c in enumerate(classes)}).to_numpy(int)
    p = np.clip(probs[np.arange(len(val)), idx], 1e-12, 1.0)
    return float(-np.log(p).mean())


def fold_tables(splits: pd.DataFrame, folds: Sequence[int] | None = None) -> dict[int, pd.DataFrame]:
    """Each fold's train and val rows (test rows dropped); every fold needs both."""
    splits = splits.copy()
    splits["split"] = splits["split"].astype(str)
    wanted = sorted(splits["fold"].unique()) if folds is None else [int(f) for f in folds]
    out = {}
    for f in wanted:
        rows = splits[(splits["fold"] == f) & splits["split"].isin(["train", "val"])].reset_index(drop=True)
        if rows.empty:
            raise ValueError(f"fold {f} not in the splits table (folds {sorted(splits['fold'].unique())})")
        for part in ("train", "val"):
            if not (rows["split"] == part).any():
                raise ValueError(f"fold {f} has no {part} slide; tuning needs train and val splits")
        out[int(f)] = rows
    return out


def tune(bags: Mapping, splits: pd.DataFrame, classes: Sequence, model_name: str,
         model_kwargs: Mapping | None = None, training: Mapping | None = None, *, n_trials: int = 20,
         seed: int = 0, timeout_s: float | None = None, objective: str = "val_nll",
         folds: Sequence[int] | None = None, log: logging.Logger | None = None):
    """Run the search; return the Optuna study (TPE sampler seeded with ``seed``).

    ``bags``: as for :func:`train_fold` (keyed by slide, or patient for case bags); ``splits``: the
    whole splits table (or the folds to use: ``folds``); ``training``: the fixed ``train_fold``
    options (epochs, patience, seed, device, ...); the searched ``lr`` / ``weight_decay`` override
    them. A trial whose training diverges is recorded as failed and the search goes on.
    """
    import optuna

    log = log or _log
    if objective not in OBJECTIVES:
        raise ValueError(f"tuning objective must be one of {OBJECTIVES}; got {objective!r}")
    classes = [str(c) for c in classes]
    tables = fold_tables(splits, folds)
    training = dict(training or {})
    train_log = logging.getLogger("slidesnake.tuning.train")

    def run_trial(trial) -> float:
        overrides, kwargs = suggest(trial, model_name, model_kwargs)
        t0 = time.perf_counter()
        scores = []
        for f, rows in tables.items():
            try:
                res = train_fold(bags, rows, classes, model_name, kwargs, log=train_log, **{**training, **overrides})
            except RuntimeError as e:  # diverged (non-finite loss)
                log.warning("trial %d fold %d failed: %s", trial.number, f, e)
                return float("nan")
            if objective == "val_nll":
                score = val_nll(res.predictions, classes)
            else:
                score = float(res.history["val_loss"].min())
            scores.append(score)
            trial.set_user_attr(f"fold_{f}", score)
            trial.set_user_attr(f"fold_{f}_best_epoch", int(res.best_epoch))
        value = float(np.mean(scores))
        log.info("trial %d: %s %.4f (folds %s) in %.1fs; %s", trial.number, objective, value,
                 ", ".join(f"{s:.4f}" for s in scores), time.perf_counter() - t0, trial.params)
        return value if math.isfinite(value) else float("nan")

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=int(seed)),
                                study_name=f"slidesnake-{model_name}")
    study.set_user_attr("model", model_name)
    study.set_user_attr("objective", objective)
    study.optimize(run_trial, n_trials=int(n_trials), timeout=timeout_s)
    return study


def trials_table(study) -> pd.DataFrame:
    """One row per trial: number, state, value, duration in seconds, params_*, user_attrs_* (per-fold scores)."""
    df = study.trials_dataframe()
    for col in ("datetime_start", "datetime_complete"):
        if col in df.columns:
            df[col] = df[col].astype(str)
    if "duration" in df.columns:
        df["duration"] = df["duration"].dt.total_seconds()
        df = df.rename(columns={"duration": "duration_s"})
    return df


def best_config(study, model_name: str, model_kwargs: Mapping | None = None) -> dict:
    """The best trial as a config fragment: ``{"training": {"model", "lr", "weight_decay", "model_kwargs"}}``.

    ``model_kwargs`` (the fixed base options of the search) are merged under the searched ones.
    """
    try:
        best = study.best_trial
    except ValueError:
        raise RuntimeError(f"no tuning trial of {model_name!r} completed (all failed?)") from None
    params = dict(best.params)
    section = {"model": model_name}
    for k in TRAINING_PARAMS:
        section[k] = float(params.pop(k))
    section["model_kwargs"] = {**dict(model_kwargs or {}), **params}
    return {"training": section}


def best_params_yaml(study, model_name: str, model_kwargs: Mapping | None = None) -> str:
    """``best_config`` as YAML, with the trial and its score in a comment header.

    The file is a valid config fragment: ``snakemake --configfile [your config] <this file>``.
    """
    import yaml

    best = study.best_trial
    doc = best_config(study, model_name, model_kwargs)
    header = (f"# Best of {len(study.trials)} Optuna trials for {model_name!r}: trial {best.number}, "
              f"{study.user_attrs.get('objective', 'objective')} {best.value:.6g} (mean over folds' val splits).\n"
              "# Train with it as the last config file: snakemake --configfile [your config] <this file>\n")
    return header + yaml.safe_dump(doc, sort_keys=False)
