"""The training stages as functions, callable from Python without Snakemake.

The rule scripts ``scripts/train.py`` and ``tune.py`` only unpack ``snakemake.input / params /
output`` and call :func:`train_job` or :func:`tune_job` (as TRIDENT's ``Processor.run_*_job`` sit
behind its CLI); the heatmap stage is :func:`slidesnake.heatmap_stage.heatmap_job`. The bags every
stage reads -- which bag the model reads, at which magnification(s), with the sample sheet where a
bag is a patient's case -- come from :func:`slidesnake.bagkinds.model_bags`, shared by training,
tuning and prediction.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

PathLike = str | os.PathLike
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ training

def train_job(*, features: Sequence[PathLike], splits: PathLike, samples: PathLike | None, fold: int,
              classes: Sequence[str], model: str, model_kwargs: Mapping | None = None,
              training: Mapping | None = None, magnification: float | None = None,
              magnifications: Sequence[float] | None = None, tensorboard: str | None = None,
              out_model: PathLike, out_history: PathLike, out_predictions: PathLike,
              log: logging.Logger | None = None, on_bad_slide: str = "fail"):
    """Rule ``train``: fold ``fold`` of ``model`` on the feature stores; writes the checkpoint, the
    per-epoch history and the fold's predictions. Excluded slides and empty bags are left out
    (logged with the reason); NaN / Inf features or a non-finite loss raise
    :class:`~slidesnake.bags.NonFiniteError` naming the slide (and fold and epoch)."""
    from slidesnake.bagkinds import bag_kind, model_bags
    from slidesnake.io import write_table
    from slidesnake.models import get_model_class
    from slidesnake.splits import read_splits
    from slidesnake.training import save_checkpoint, train_fold

    log = log or _log
    table = read_splits(splits)
    rows = table[table["fold"] == int(fold)]
    if rows.empty:
        raise ValueError(f"fold {fold} not in {splits} (folds {sorted(table['fold'].unique())})")
    mag = None if magnification is None else float(magnification)
    mags = [float(m) for m in magnifications] if magnifications else None
    # The model's bag_type says what to build: one magnification per slide (flat), every magnification of
    # training.magnifications with parent links (multiscale), or a patient's slides by stain (hierarchical).
    bag_type = get_model_class(model).bag_type
    bags = model_bags(features, rows["slide_id"].tolist(), bag_type=bag_type, magnification=mag,
                      magnifications=mags, samples=samples, log=log, on_bad_slide=on_bad_slide)
    result = train_fold(bags, rows, list(classes), model, dict(model_kwargs or {}), log=log,
                        tensorboard=tensorboard or None, **dict(training or {}))
    save_checkpoint(out_model, result, {"magnification": mag, "bag_type": bag_type,
                                        "magnifications": bag_kind(bag_type).checkpoint_magnifications(mags)})
    write_table(result.history, out_history)
    write_table(result.predictions, out_predictions)
    log.info("fold %d: best epoch %d; wrote %s", int(fold), result.best_epoch, out_model)
    return result


def tune_job(*, features: Sequence[PathLike], splits: PathLike, samples: PathLike, classes: Sequence[str],
             model: str, model_kwargs: Mapping | None = None, training: Mapping | None = None,
             tuning: Mapping | None = None, magnification: float | None = None,
             magnifications: Sequence[float] | None = None, out_study: PathLike, out_best: PathLike,
             log: logging.Logger | None = None, on_bad_slide: str = "fail"):
    """Rule ``tune``: Optuna search of ``model``'s hyperparameters over the folds' train/val splits
    (config ``tuning``: n_trials, seed, timeout_s, objective); writes the trials table and the best
    parameters as a config snippet. Only train and val slides are read: tuning never looks at a test
    split."""
    from slidesnake.bagkinds import model_bags
    from slidesnake.io import atomic_path, write_table
    from slidesnake.models import get_model_class
    from slidesnake.splits import read_splits
    from slidesnake.tuning import best_params_yaml, trials_table, tune

    log = log or _log
    table = read_splits(splits)
    wanted = table.loc[table["split"].astype(str).isin(["train", "val"]), "slide_id"].unique().tolist()
    bags = model_bags(features, wanted, bag_type=get_model_class(model).bag_type, magnification=magnification,
                      magnifications=magnifications, samples=samples, log=log, on_bad_slide=on_bad_slide)
    cfg = dict(tuning or {})
    base_kwargs = dict(model_kwargs or {})
    study = tune(bags, table, list(classes), model, base_kwargs, dict(training or {}),
                 n_trials=cfg.get("n_trials", 20), seed=cfg.get("seed", 0), timeout_s=cfg.get("timeout_s"),
                 objective=cfg.get("objective", "val_nll"), log=log)
    write_table(trials_table(study), out_study)
    with atomic_path(out_best) as tmp:
        tmp.write_text(best_params_yaml(study, model, base_kwargs))
    log.info("%s: best trial %d, value %.4f, params %s", model, study.best_trial.number, study.best_value,
             study.best_trial.params)
    return study
