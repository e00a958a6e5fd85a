"""Inference with a trained run's fold models: fold-ensemble predictions and patch-by-patch predictions.

- :func:`ensemble_predictions` applies every fold checkpoint of a run to bags of new slides (or
  cases, for hierarchical models) and averages the class probabilities over the folds; used by rule
  ``predict`` (new cohorts) and reusable for a held-out test set.
- :func:`model_record` / :func:`models_table`: which checkpoints were used (path, sha256).
- :func:`fold_checkpoints`: the ``fold_<k>/model.pt`` files of a run, with a one-line error naming a
  missing one.
- :func:`patch_probabilities`: every tile of a flat bag scored alone, as a bag of one tile
  (``MILModel.single_instance_logits``), for the heatmaps' patch-by-patch predictions.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from slidesnake.io import sha256_file

# torch and the training code are imported where used: the workflow's parser imports this module
# (fold_checkpoints) and should not pay for torch.

_log = logging.getLogger("slidesnake.predict")
MODEL_COLUMNS = ["fold", "path", "sha256", "model_name", "bag_type", "in_dim", "classes", "best_epoch"]


def fold_checkpoints(models_dir: str | os.PathLike, folds: Sequence[int]) -> list[str]:
    """``<models_dir>/fold_<k>/model.pt`` for every fold; FileNotFoundError (one line, naming the first
    missing file) when one is absent."""
    paths = [os.path.join(os.fspath(models_dir), f"fold_{int(k)}", "model.pt") for k in folds]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"predict: trained model {missing[0]} not found{more}; train first (snakemake --configfile "
            "<the training config>), or point config predict.models at a run's models/<model> directory")
    return paths


def model_record(path: str | os.PathLike, ckpt: Mapping, fold: int | None = None) -> dict:
    """One row of ``models.tsv``: fold, path, sha256 and what the checkpoint holds."""
    from slidesnake.models import get_model_class

    return {
        "fold": ckpt.get("fold") if fold is None else fold,
        "path": os.fspath(path),
        "sha256": sha256_file(path),
        "model_name": ckpt["model_name"],
        "bag_type": ckpt.get("bag_type") or get_model_class(ckpt["model_name"]).bag_type,
        "in_dim": int(ckpt["in_dim"]),
        "classes": ",".join(map(str, ckpt["classes"])),
        "best_epoch": ckpt.get("best_epoch"),
    }


def models_table(model_paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """:func:`model_record` of each checkpoint (``MODEL_COLUMNS``)."""
    import torch

    rows = []
    for p in model_paths:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        rows.append(model_record(p, ckpt))
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


def _fold_labels(ckpts: Sequence[Mapping]) -> list[int]:
    """The checkpoints' own fold numbers when they are distinct, else their positions 0, 1, ..."""
    folds = [c.get("fold") for c in ckpts]
    if all(f is not None for f in folds) and len(set(folds)) == len(folds):
        return [int(f) for f in folds]
    return list(range(len(ckpts)))


def ensemble_predictions(model_paths: Sequence[str | os.PathLike], bags: Mapping[str, object], *,
                         device: str = "cpu", log: logging.Logger | None = None) -> pd.DataFrame:
    """Fold-ensemble class probabilities of every bag.

    ``model_paths``: checkpoints of one run (``models/<model>/fold_<k>/model.pt``), all with the same
    classes and bag type. ``bags``: id -> bag of the models' ``bag_type`` (:func:`slidesnake.training.load_bags`:
    slide_id -> features for flat and multiscale models, patient_id -> case bag for hierarchical ones).
    Each model applies its own feature standardisation (:func:`slidesnake.training.predict_output`).

    Returns one row per bag, in ``bags`` order: ``slide_id`` (the bag's id: a slide, or a patient for
    hierarchical models, as in the training prediction tables), ``n_tiles``, ``prob_<class>`` (mean over
    the models), ``pred`` (class of the largest mean probability), ``fold<k>_prob_<class>`` (each model;
    ``k`` is the checkpoint's fold) and ``status`` (``ok``, or why the bag has no prediction, e.g. an
    empty bag: probabilities NaN, ``pred`` empty). ``.attrs["models"]`` holds :func:`model_record` of
    every checkpoint (path, sha256, fold), the content of ``models.tsv``.
    """
    from slidesnake.bags import empty_reason, feature_dims, n_instances
    from slidesnake.training import load_checkpoint, predict_output

    log = log or _log
    if not model_paths:
        raise ValueError("ensemble_predictions needs at least one model checkpoint")
    loaded = [load_checkpoint(p, device) for p in model_paths]
    ckpts = [c for _, c in loaded]
    classes = [str(c) for c in ckpts[0]["classes"]]
    for p, (m, c) in zip(model_paths, loaded):
        if [str(x) for x in c["classes"]] != classes:
            raise ValueError(f"{p}: classes {list(c['classes'])} differ from {model_paths[0]}'s {classes}; "
                             "an ensemble needs the models of one run")
        if m.bag_type != loaded[0][0].bag_type:
            raise ValueError(f"{p}: a {m.bag_type!r} model among {loaded[0][0].bag_type!r} models; "
                             "an ensemble needs the models of one run")
    folds = _fold_labels(ckpts)
    records = [model_record(p, c, f) for p, c, f in zip(model_paths, ckpts, folds)]
    rows = []
    for key, bag in bags.items():
        reason = empty_reason(bag)
        row = {"slide_id": str(key), "n_tiles": n_instances(bag)}
        per_fold = []
        if not reason:
            dims = feature_dims(bag)
            for p, (model, ckpt) in zip(model_paths, loaded):
                if dims != {int(ckpt["in_dim"])}:
                    raise ValueError(f"{key}: features of dimension {sorted(dims)} but {p} expects "
                                     f"{int(ckpt['in_dim'])}; extract features with the backbone the models "
                                     "were trained on (config features.backbone)")
                probs, _ = predict_output(model, ckpt, bag)
                per_fold.append(np.asarray(probs, np.float64).reshape(-1))
        else:
            log.warning("%s: %s; no prediction", key, reason)
        mean = np.mean(per_fold, axis=0) if per_fold else np.full(len(classes), np.nan)
        for j, c in enumerate(classes):
            row[f"prob_{c}"] = float(mean[j])
        row["pred"] = classes[int(np.argmax(mean))] if per_fold else ""
        for f, probs in zip(folds, per_fold or [np.full(len(classes), np.nan)] * len(folds)):
            for j, c in enumerate(classes):
                row[f"fold{f}_prob_{c}"] = float(probs[j])
        row["status"] = "ok" if per_fold else reason
        rows.append(row)
    columns = (["slide_id", "n_tiles"] + [f"prob_{c}" for c in classes] + ["pred"]
               + [f"fold{f}_prob_{c}" for f in folds for c in classes] + ["status"])
    out = pd.DataFrame(rows, columns=columns)
    out.attrs["models"] = records
    log.info("predicted %d of %d bags with the mean of %d models (folds %s)",
             int((out["status"] == "ok").sum()), len(out), len(model_paths), folds)
    return out


# ------------------------------------------------------------------------------ patch predictions

def supports_patch_predictions(model) -> bool:
    """Whether a tile alone is a bag the model reads: flat models (a multiscale bag needs every
    magnification, a case bag a patient's slides)."""
    from slidesnake.bagkinds import bag_kind

    return bag_kind(getattr(model, "bag_type", "flat")).scores_single_tiles


def patch_probabilities(model, ckpt: Mapping, features, *, chunk_size: int = 4096) -> np.ndarray:
    """Class probabilities ``(N, n_classes)`` of every tile of a flat bag scored alone, as a bag of one
    tile (all attention on it), standardised as in training.

    Uses the model's ``single_instance_logits`` (batched for abmil, clam, da_mil and transmil; the base
    class's default runs one forward per tile), ``chunk_size`` tiles at a time. ValueError for models
    that do not read flat bags.
    """
    import torch

    from slidesnake.training import _standardise

    if not supports_patch_predictions(model):
        raise ValueError(f"{type(model).__name__} reads {model.bag_type!r} bags; a single tile is not a bag "
                         "it can score (patch predictions need a flat-bag model)")
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"patch_probabilities needs an (N, D) bag; got shape {features.shape}")
    if not len(features):
        return np.zeros((0, model.n_classes))
    dev = next(model.parameters()).device
    mean = torch.as_tensor(ckpt["feature_mean"], dtype=torch.float32)
    std = torch.as_tensor(ckpt["feature_std"], dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(features), int(chunk_size)):
            x = _standardise(features[start:start + int(chunk_size)], mean, std, dev)
            out.append(torch.softmax(model.single_instance_logits(x).float(), dim=-1).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def predict_sheet_bags(stores: Sequence[str | os.PathLike], sheet: pd.DataFrame, ckpt: Mapping,
                       log: logging.Logger | None = None, on_bad_slide: str = "fail") -> dict:
    """The bags a checkpoint reads for the slides of a predict sheet (every slide with a store), built
    as in training: its ``bag_type`` at its ``magnification`` / ``magnifications``."""
    from slidesnake.models import get_model_class
    from slidesnake.bagkinds import model_bags

    bag_type = ckpt.get("bag_type") or get_model_class(ckpt["model_name"]).bag_type
    return model_bags(stores, [str(s) for s in sheet["slide_id"]], bag_type=bag_type,
                      magnification=ckpt.get("magnification"), magnifications=ckpt.get("magnifications"),
                      samples=sheet, log=log, on_bad_slide=on_bad_slide)


__all__ = ["ensemble_predictions", "models_table", "model_record", "fold_checkpoints",
           "patch_probabilities", "supports_patch_predictions", "predict_sheet_bags", "MODEL_COLUMNS"]
