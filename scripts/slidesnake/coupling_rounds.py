"""Coupling rounds (config ``training.coupling``, :mod:`slidesnake.coupling`): the per-round cohort
summary and the stores of a slide's last round. Kept apart from :mod:`slidesnake.coupling` so the
summary and heatmap jobs do not import the embedder step's dependencies (and vice versa)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import pandas as pd


def oof_localisation(stores_by_fold: Mapping[int, Mapping[str, str]], models: Mapping[int, str],
                     test_slides: Mapping[int, Sequence[str]], labels: Mapping[str, str],
                     annotations: str | None, magnification: float | None,
                     positive: Sequence[str]) -> float:
    """Cohort mean localisation AUC of the out-of-fold attention of one round (tiles inside the
    annotated regions vs outside; slides of ``positive`` classes with an annotation)."""
    from slidesnake.heatmap import localisation_table
    from slidesnake.store import open_store
    from slidesnake.training import load_checkpoint, predict_bag

    if not annotations:
        return float("nan")
    entries = []
    for fold, sids in test_slides.items():
        model, ckpt = load_checkpoint(models[fold])
        for sid in sids:
            gj = os.path.join(annotations, f"{sid}.geojson")
            store = open_store(stores_by_fold[fold][sid])
            if store.excluded or not os.path.exists(gj):
                continue
            f = store.features(magnification)
            if not len(f):
                continue
            _, att = predict_bag(model, ckpt, f)
            coords, size = store.coords(magnification), store.size(magnification)
            tiles = pd.DataFrame({"magnification": magnification or 0.0, "x": coords[:, 0], "y": coords[:, 1],
                                  "w": size[:, 0], "h": size[:, 1], "attention": att})
            entries.append((sid, labels[sid], tiles, gj))
    if not entries:
        return float("nan")
    table = localisation_table(entries, positive=set(positive))
    return float(table["auc"].iloc[-1])


def round_summary(predictions: Mapping[int, Sequence[pd.DataFrame]], classes: Sequence[str],
                  localisation: Mapping[int, float] | None = None) -> pd.DataFrame:
    """One row per round: the usual summary's mean and sd over folds of each metric (and the fold
    ensemble's AUC with a fixed test set), the pooled out-of-fold AUC, and the mean localisation AUC
    of the round's out-of-fold attention (NaN without annotations)."""
    from slidesnake.evaluate import METRICS, auc_score, prob_columns, summarize

    rows = []
    for rnd in sorted(predictions):
        summary, oof = summarize(list(predictions[rnd]), classes)
        s = summary.set_index(summary["fold"].astype(str))
        row = {"round": int(rnd), "n_folds": len(predictions[rnd])}
        for m in METRICS:
            row[f"{m}_mean"] = float(s.loc["mean", m])
            row[f"{m}_sd"] = float(s.loc["sd", m])
        if "ensemble" in s.index:
            row["auc_ensemble"] = float(s.loc["ensemble", "auc"])
        if len(oof):
            y = oof["label"].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
            row["auc_pooled"] = auc_score(y, oof[prob_columns(classes)].to_numpy(float))
        row["localisation_auc"] = float((localisation or {}).get(rnd, float("nan")))
        rows.append(row)
    return pd.DataFrame(rows)


def coupled_stores(store_input) -> dict[int, str] | None:
    """fold -> store path when the heatmap rule's ``store`` input lists one store per fold
    (``.../round_<R>/fold_<k>/features/<slide>.zarr``, training.coupling); None for the usual single store."""
    import re

    paths = [store_input] if isinstance(store_input, (str, os.PathLike)) else list(store_input)
    out = {}
    for path in paths:
        m = re.search(r"/round_\d+/fold_(\d+)/features/[^/]+\.zarr$", str(path))
        if not m:
            return None
        out[int(m.group(1))] = str(path)
    return out or None
