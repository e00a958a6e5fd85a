"""Cohort metrics across folds and ROC / confusion plots.

Per-fold predictions (``models/<model>/fold_<k>/predictions.csv``: slide_id, patient_id, label,
split, prob_<class>..., pred) are reduced to one row of test metrics per fold plus ``mean`` and
``sd`` rows, and the out-of-fold (OOF) table of every slide's test prediction.
:func:`bootstrap_ci` adds percentile bootstrap confidence intervals of the pooled OOF metrics
(resampling patients).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, precision_recall_fscore_support,
                             roc_auc_score, roc_curve)

from slidesnake.io import save_figure

log = logging.getLogger("slidesnake.evaluate")
METRICS = ("auc", "accuracy", "balanced_accuracy", "precision", "recall", "f1")


def auc_score(y: np.ndarray, probs: np.ndarray) -> float:
    """Bag AUC from class indices ``y`` and probabilities ``(n, C)``.

    Binary: AUC of the last (positive) class. More classes: one-vs-rest macro average (as
    ``roc_auc_score(multi_class="ovr", average="macro")``) over the classes present in ``y``.
    NaN when ``y`` holds fewer than two classes.
    """
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=float)
    if len(np.unique(y)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y == 1, probs[:, 1]))
    return float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in np.unique(y)]))


def prob_columns(classes: Sequence[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def fold_metrics(pred: pd.DataFrame, classes: Sequence[str], fold=None) -> dict:
    """Test metrics of one fold's predictions (rows already restricted to one split)."""
    classes = [str(c) for c in classes]
    y_true = pred["label"].astype(str).to_numpy()
    y_pred = pred["pred"].astype(str).to_numpy()
    idx = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(y_true) - set(classes))
    if unknown:
        raise ValueError(f"fold {fold}: label(s) {unknown} not in classes {classes}")
    row = {"fold": fold, "n": int(len(pred))}
    if len(set(y_true)) < 2:
        log.warning("fold %s: test split has a single class (%s); AUC undefined (NaN)", fold, sorted(set(y_true)))
        row["auc"] = float("nan")
    else:
        row["auc"] = auc_score(np.array([idx[v] for v in y_true]), pred[prob_columns(classes)].to_numpy(float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes absent from y_true/y_pred
        row["accuracy"] = float(accuracy_score(y_true, y_pred))
        row["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes, average="macro",
                                                     zero_division=0)
    row.update(precision=float(p), recall=float(r), f1=float(f))
    return row


def fold_ensemble(test: pd.DataFrame, classes: Sequence) -> pd.DataFrame:
    """Mean class probabilities over folds of slides every fold tested (a fixed held-out test set).

    ``test``: the folds' test rows stacked (``fold, slide_id, patient_id, label, split,
    prob_<class>..., pred``). One row per slide, in first-seen order: ``prob_<class>`` the mean over
    folds, ``pred`` its argmax, ``n_folds`` and ``fold<k>_prob_<class>`` each fold's probabilities.
    """
    classes = [str(c) for c in classes]
    cols = prob_columns(classes)
    keys = [c for c in ("slide_id", "patient_id", "label", "split") if c in test.columns]
    order = pd.unique(test["slide_id"])
    mean = test.groupby("slide_id", sort=False)[cols].mean()
    out = test.drop_duplicates("slide_id").set_index("slide_id").loc[order, keys[1:]]
    out = pd.concat([out, mean.loc[order]], axis=1)
    out["pred"] = np.asarray(classes)[np.argmax(out[cols].to_numpy(float), axis=1)]
    out["n_folds"] = test.groupby("slide_id", sort=False)["fold"].nunique().loc[order]
    wide = test.pivot(index="slide_id", columns="fold", values=cols)
    for fold in sorted(test["fold"].unique()):
        for c in classes:
            out[f"fold{fold}_prob_{c}"] = wide[(f"prob_{c}", fold)].loc[order]
    return out.reset_index()


def summarize(fold_predictions: Sequence[pd.DataFrame], classes: Sequence) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-fold test metrics with ``mean`` and ``sd`` rows, and the cohort predictions.

    Cross-validation (each slide tested by one fold): the cohort predictions are the out-of-fold
    ones. Fixed held-out test set (every fold tests the same slides, ``splits.test_fraction``): the
    cohort predictions are the fold ensemble (:func:`fold_ensemble`) and the summary gains an
    ``ensemble`` row of its metrics. A ``fold`` column in a prediction table names its fold, else
    its position in the list does.
    """
    classes = [str(c) for c in classes]
    rows, oof = [], []
    for i, pred in enumerate(fold_predictions):
        pred = pred.copy()
        if "fold" not in pred.columns:
            pred.insert(0, "fold", i)
        folds = pred["fold"].unique()
        if len(folds) != 1:
            raise ValueError(f"prediction table {i} holds several folds: {sorted(folds)}")
        missing = [c for c in ["slide_id", "label", "split", "pred", *prob_columns(classes)] if c not in pred.columns]
        if missing:
            raise ValueError(f"prediction table of fold {folds[0]} lacks column(s) {missing}")
        test = pred[pred["split"].astype(str) == "test"]
        if test.empty:
            log.warning("fold %s: no test predictions", folds[0])
            rows.append({"fold": folds[0], "n": 0, **{m: float("nan") for m in METRICS}})
            continue
        rows.append(fold_metrics(test, classes, fold=folds[0]))
        oof.append(test)
    per_fold = pd.DataFrame(rows, columns=["fold", "n", *METRICS])
    mean = {"fold": "mean", "n": per_fold["n"].mean(), **per_fold[list(METRICS)].mean().to_dict()}
    sd = {"fold": "sd", "n": per_fold["n"].std(), **per_fold[list(METRICS)].std().to_dict()}
    summary = pd.concat([per_fold.astype({"fold": object}), pd.DataFrame([mean, sd])], ignore_index=True)
    oof_df = pd.concat(oof, ignore_index=True) if oof else pd.DataFrame()
    if not oof_df.empty:
        dup = oof_df["slide_id"][oof_df["slide_id"].duplicated()]
        tested = [frozenset(t["slide_id"]) for t in oof]
        if len(dup) and len(oof) == len(fold_predictions) and all(t == tested[0] for t in tested):
            oof_df = fold_ensemble(oof_df, classes)
            ens = fold_metrics(oof_df, classes, fold="ensemble")
            log.info("fixed test set of %d slides, every fold tested on it: ensemble of %d folds, AUC %.3f",
                     len(oof_df), len(oof), ens["auc"])
            summary = pd.concat([summary, pd.DataFrame([ens])], ignore_index=True)
        elif len(dup):
            raise ValueError(f"slide(s) tested in more than one fold: {sorted(set(dup))[:10]} (and the folds' "
                             "test sets differ, so this is neither cross-validation nor a fixed test set)")
    return summary, oof_df


# ----------------------------------------------------------------------------- bootstrap CIs

CI_COLUMNS = ("metric", "estimate", "ci_low", "ci_high", "n_valid", "n_bootstrap", "level", "unit", "n_units")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank (``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    bounds = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((bounds[:-1] + bounds[1:] + 1) / 2, np.diff(bounds))
    return ranks


def _rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank sum (ties count one half), as ``roc_auc_score``."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(score, dtype=float))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metric_values(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """:data:`METRICS` from class indices ``y`` and ``pred`` and probabilities ``(n, C)``.

    The same values as :func:`fold_metrics` (AUC as :func:`auc_score`; balanced accuracy = mean
    recall over the classes present in ``y``; precision / recall / F1 macro over all classes, 0 where
    undefined), computed with numpy so that bootstrap resamples are cheap.
    """
    y = np.asarray(y, dtype=int)
    pred = np.asarray(pred, dtype=int)
    present = np.unique(y)
    if len(present) < 2:
        auc = float("nan")
    elif n_classes == 2:
        auc = _rank_auc(y == 1, probs[:, 1])
    else:
        auc = float(np.mean([_rank_auc(y == c, probs[:, c]) for c in present]))
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(float)
    true_n, pred_n = cm.sum(1).astype(float), cm.sum(0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall_c = np.where(true_n > 0, tp / true_n, 0.0)
        precision_c = np.where(pred_n > 0, tp / pred_n, 0.0)
        denom = true_n + pred_n
        f1_c = np.where(denom > 0, 2 * tp / denom, 0.0)
    return {
        "auc": auc,
        "accuracy": float(tp.sum() / len(y)) if len(y) else float("nan"),
        "balanced_accuracy": float(recall_c[true_n > 0].mean()) if len(y) else float("nan"),
        "precision": float(precision_c.mean()),
        "recall": float(recall_c.mean()),
        "f1": float(f1_c.mean()),
    }


def bootstrap_ci(oof: pd.DataFrame, classes: Sequence, n_bootstrap: int = 1000, level: float = 0.95,
                 seed: int = 0, unit: str = "patient") -> pd.DataFrame:
    """Percentile bootstrap confidence intervals of :data:`METRICS` on the pooled OOF predictions.

    Resamples ``unit``\\ s with replacement (``patient``: every slide of a drawn patient comes along,
    as often as the patient is drawn, so that slides of one patient are not treated as independent;
    ``slide``: rows), ``n_bootstrap`` times with ``numpy.random.default_rng(seed)``. A resample in
    which a metric is undefined (AUC with one class) is left out of that metric's interval;
    ``n_valid`` counts the resamples used. One row per metric: ``metric, estimate`` (on the whole
    table), ``ci_low, ci_high, n_valid, n_bootstrap, level, unit, n_units``.
    """
    classes = [str(c) for c in classes]
    if unit not in ("patient", "slide"):
        raise ValueError(f"bootstrap unit must be 'patient' or 'slide'; got {unit!r}")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1); got {level}")
    if int(n_bootstrap) < 1:
        raise ValueError(f"n_bootstrap must be >= 1; got {n_bootstrap}")
    if oof.empty:
        return pd.DataFrame([{"metric": m, "estimate": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n_valid": 0,
                              "n_bootstrap": int(n_bootstrap), "level": level, "unit": unit, "n_units": 0}
                             for m in METRICS], columns=list(CI_COLUMNS))
    idx = {c: i for i, c in enumerate(classes)}
    labels, preds = oof["label"].astype(str), oof["pred"].astype(str)
    unknown = sorted((set(labels) | set(preds)) - set(classes))
    if unknown:
        raise ValueError(f"label/pred value(s) {unknown} not in classes {classes}")
    y = labels.map(idx).to_numpy(int)
    pred = preds.map(idx).to_numpy(int)
    probs = oof[prob_columns(classes)].to_numpy(float)
    k = len(classes)
    if unit == "patient" and "patient_id" not in oof.columns:
        log.warning("no patient_id column; bootstrap resamples slides")
        unit = "slide"
    groups = oof["patient_id"].astype(str).to_numpy() if unit == "patient" else np.arange(len(oof))
    _, codes = np.unique(groups, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_units = len(sizes)

    rng = np.random.default_rng(seed)
    values = np.full((int(n_bootstrap), len(METRICS)), np.nan)
    for b in range(int(n_bootstrap)):
        drawn = rng.integers(0, n_units, n_units)
        lens = sizes[drawn]
        within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        rows = order[np.repeat(starts[drawn], lens) + within]
        m = metric_values(y[rows], probs[rows], pred[rows], k)
        values[b] = [m[name] for name in METRICS]
    estimate = metric_values(y, probs, pred, k)
    alpha = (1 - level) / 2
    out = []
    for j, name in enumerate(METRICS):
        v = values[:, j][np.isfinite(values[:, j])]
        lo, hi = (np.quantile(v, [alpha, 1 - alpha]) if len(v) else (np.nan, np.nan))
        out.append({"metric": name, "estimate": estimate[name], "ci_low": float(lo), "ci_high": float(hi),
                    "n_valid": int(len(v)), "n_bootstrap": int(n_bootstrap), "level": float(level), "unit": unit,
                    "n_units": int(n_units)})
    return pd.DataFrame(out, columns=list(CI_COLUMNS))


# --------------------------------------------------------------------------------------- plots

def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _as_frame(preds) -> pd.DataFrame:
    if isinstance(preds, pd.DataFrame):
        df = preds.copy()
        if "fold" not in df.columns:
            df["fold"] = 0
        return df
    parts = []
    for i, p in enumerate(preds):
        p = p.copy()
        if "fold" not in p.columns:
            p["fold"] = i
        parts.append(p[p["split"].astype(str) == "test"] if "split" in p.columns else p)
    return pd.concat(parts, ignore_index=True)


def plot_roc(preds, classes: Sequence, path: str | os.PathLike, overall: pd.DataFrame | None = None,
             overall_label: str = "pooled OOF") -> None:
    """Per-fold ROC curves and the pooled out-of-fold curve (AUC in the legend).

    ``preds``: the OOF table (with a ``fold`` column) or a list of per-fold tables (test rows
    used). Binary: one panel for the positive (last) class; more classes: one-vs-rest panel per class.
    ``overall`` (default: ``preds`` pooled) is the thick curve, e.g. the fold ensemble on a fixed
    test set, labelled ``overall_label``.
    """
    classes = [str(c) for c in classes]
    df = _as_frame(preds)
    whole = df if overall is None else overall
    panels = [classes[-1]] if len(classes) == 2 else classes
    fig = _figure((4.2 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, c in zip(axes, panels):
        for fold, g in df.groupby("fold"):
            y = g["label"].astype(str).to_numpy() == c
            if y.all() or not y.any():
                continue
            fpr, tpr, _ = roc_curve(y, g[f"prob_{c}"].to_numpy(float))
            ax.plot(fpr, tpr, lw=1, alpha=0.5, label=f"fold {fold} (AUC {roc_auc_score(y, g[f'prob_{c}']):.3f})")
        y = whole["label"].astype(str).to_numpy() == c
        if y.any() and not y.all():
            fpr, tpr, _ = roc_curve(y, whole[f"prob_{c}"].to_numpy(float))
            ax.plot(fpr, tpr, lw=2.5, color="black",
                    label=f"{overall_label} (AUC {roc_auc_score(y, whole[f'prob_{c}']):.3f})")
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=f"ROC: {c}" + (" vs rest" if len(classes) > 2 else ""), aspect="equal")
        ax.legend(loc="lower right", fontsize="small")
    save_figure(fig, path, dpi=120)


def plot_confusion(oof: pd.DataFrame, classes: Sequence, path: str | os.PathLike) -> None:
    """Confusion matrix (counts) of the out-of-fold predictions."""
    from sklearn.metrics import ConfusionMatrixDisplay

    classes = [str(c) for c in classes]
    fig = _figure((1.5 + 1.1 * len(classes), 1.2 + 1.1 * len(classes)))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        oof["label"].astype(str), oof["pred"].astype(str), labels=classes, ax=ax, colorbar=False, cmap="Blues"
    )
    ax.set_title(f"out-of-fold (n={len(oof)})")
    save_figure(fig, path, dpi=120)
