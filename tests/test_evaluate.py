"""Cohort metrics, OOF table, plots and the summarize rule script."""

from __future__ import annotations

import logging
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score,
                             roc_auc_score)

from slidesnake.evaluate import auc_score, plot_confusion, plot_roc, summarize

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def fold_table(fold, labels, probs, classes, split="test", start=0):
    probs = np.asarray(probs, float)
    df = pd.DataFrame({"fold": fold, "slide_id": [f"f{fold}s{start + i}" for i in range(len(labels))],
                       "patient_id": [f"p{fold}{i}" for i in range(len(labels))], "label": labels,
                       "split": split})
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = probs[:, j]
    df["pred"] = [classes[j] for j in probs.argmax(1)]
    return df


def binary(fold, labels, p_pos, **kw):
    p = np.asarray(p_pos)
    return fold_table(fold, labels, np.c_[1 - p, p], ["neg", "pos"], **kw)


def test_binary_metrics_match_sklearn():
    f0 = binary(0, ["neg", "neg", "pos", "pos", "pos", "neg"], [0.1, 0.6, 0.8, 0.4, 0.9, 0.3])
    f1 = binary(1, ["pos", "neg", "neg", "pos"], [0.7, 0.2, 0.55, 0.45])
    train = binary(1, ["pos", "neg"], [0.9, 0.1], split="train", start=10)
    summary, oof = summarize([f0, pd.concat([f1, train])], ["neg", "pos"])
    assert summary["fold"].tolist() == [0, 1, "mean", "sd"]
    for i, f in enumerate((f0, f1)):
        row = summary.iloc[i]
        y, yp = f["label"], f["pred"]
        assert row["n"] == len(f)
        assert row["auc"] == pytest.approx(roc_auc_score(y == "pos", f["prob_pos"]))
        assert row["accuracy"] == pytest.approx(accuracy_score(y, yp))
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, yp))
        assert row["precision"] == pytest.approx(precision_score(y, yp, average="macro"))
        assert row["recall"] == pytest.approx(recall_score(y, yp, average="macro"))
        assert row["f1"] == pytest.approx(f1_score(y, yp, average="macro"))
    for m in ("auc", "accuracy", "f1"):
        vals = summary[m].iloc[:2].astype(float)
        assert summary[m].iloc[2] == pytest.approx(vals.mean())
        assert summary[m].iloc[3] == pytest.approx(vals.std(ddof=1))
    assert len(oof) == 10 and oof["slide_id"].is_unique and (oof["split"] == "test").all()
    assert set(oof["fold"]) == {0, 1}


def test_multiclass_auc_is_ovr_macro():
    classes = ["a", "b", "c"]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=12)
    labels = [classes[i] for i in [0, 1, 2] * 4]
    f = fold_table(0, labels, probs, classes)
    summary, _ = summarize([f], classes)
    y = np.array([classes.index(v) for v in labels])
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert summary.loc[0, "auc"] == pytest.approx(expected)
    assert auc_score(y, probs) == pytest.approx(expected)
    assert summary.loc[0, "f1"] == pytest.approx(f1_score(labels, f["pred"], average="macro"))


def test_single_class_fold_gives_nan_auc(caplog):
    f0 = binary(0, ["neg", "pos", "pos"], [0.2, 0.7, 0.6])
    f1 = binary(1, ["neg", "neg"], [0.3, 0.6])
    with caplog.at_level(logging.WARNING, logger="slidesnake.evaluate"):
        summary, oof = summarize([f0, f1], ["neg", "pos"])
    assert "single class" in caplog.text
    assert np.isnan(summary.loc[1, "auc"])
    assert summary.loc[1, "accuracy"] == 0.5
    assert summary.loc[2, "auc"] == pytest.approx(1.0)  # mean skips NaN
    assert len(oof) == 5


def test_duplicate_test_slide_rejected():
    f0 = binary(0, ["neg", "pos"], [0.2, 0.7])
    f1 = pd.concat([f0.iloc[:1], binary(1, ["pos"], [0.9], start=5)]).assign(fold=1)
    with pytest.raises(ValueError, match="more than one fold"):
        summarize([f0, f1], ["neg", "pos"])


def test_fixed_test_set_gives_the_fold_ensemble():
    """Every fold tested on the same slides (splits.test_fraction): per-fold rows on that set, and
    the cohort predictions and an `ensemble` row from the mean of the folds' probabilities."""
    labels = ["neg", "neg", "pos", "pos"]
    folds = [binary(0, labels, [0.1, 0.6, 0.4, 0.9]), binary(0, labels, [0.3, 0.2, 0.8, 0.45]),
             binary(0, labels, [0.2, 0.7, 0.35, 0.8])]
    folds = [f.assign(fold=i) for i, f in enumerate(folds)]
    summary, ens = summarize(folds, ["neg", "pos"])
    assert list(summary["fold"]) == [0, 1, 2, "mean", "sd", "ensemble"]
    mean_pos = np.mean([f["prob_pos"] for f in folds], axis=0)
    np.testing.assert_allclose(ens["prob_pos"], mean_pos)
    np.testing.assert_allclose(ens["prob_neg"] + ens["prob_pos"], 1)
    np.testing.assert_allclose(ens["fold1_prob_pos"], folds[1]["prob_pos"])
    assert list(ens["slide_id"]) == list(folds[0]["slide_id"]) and (ens["n_folds"] == 3).all()
    assert list(ens["pred"]) == ["pos" if p > 0.5 else "neg" for p in mean_pos]
    row = summary.set_index("fold").loc["ensemble"]
    assert row["n"] == 4
    assert row["auc"] == pytest.approx(roc_auc_score([0, 0, 1, 1], mean_pos))
    # each fold is scored on the whole fixed set
    for i, f in enumerate(folds):
        assert summary.set_index("fold").loc[i, "auc"] == pytest.approx(roc_auc_score([0, 0, 1, 1], f["prob_pos"]))


@pytest.mark.parametrize("classes", [["neg", "pos"], ["a", "b", "c"]])
def test_plots_written(tmp_path, classes):
    rng = np.random.default_rng(1)
    folds = [fold_table(i, [classes[j % len(classes)] for j in range(9)], rng.dirichlet(np.ones(len(classes)), 9),
                        classes) for i in range(3)]
    folds.append(fold_table(3, [classes[0]] * 3, rng.dirichlet(np.ones(len(classes)), 3), classes))  # one class
    _, oof = summarize(folds, classes)
    plot_roc(oof, classes, tmp_path / "roc.png")
    plot_roc(folds, classes, tmp_path / "roc_list.png")
    plot_confusion(oof, classes, tmp_path / "confusion.png")
    for name in ("roc.png", "roc_list.png", "confusion.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "roc.png", "roc_list.png"]


def test_summarize_script(tmp_path):
    paths = []
    rng = np.random.default_rng(2)
    for i in range(3):
        labels = ["0", "1"] * 3
        df = fold_table(i, labels, rng.dirichlet([1, 1], 6), ["0", "1"])
        paths.append(tmp_path / f"fold_{i}" / "predictions.csv")
        paths[-1].parent.mkdir()
        df.to_csv(paths[-1], index=False)
    out = tmp_path / "summary"
    sm = SimpleNamespace(
        input=SimpleNamespace(predictions=[str(p) for p in paths]), params=SimpleNamespace(classes=[0, 1]),
        output=SimpleNamespace(summary=str(out / "summary.csv"), predictions=str(out / "predictions.csv"),
                               roc=str(out / "roc.png"), confusion=str(out / "confusion.png")),
        log=[],
    )
    runpy.run_path(str(SCRIPTS / "summarize.py"), init_globals={"snakemake": sm})
    summary = pd.read_csv(out / "summary.csv")
    assert summary["fold"].astype(str).tolist() == ["0", "1", "2", "mean", "sd"]
    oof = pd.read_csv(out / "predictions.csv", dtype={"label": str})
    assert len(oof) == 18 and set(oof["label"]) == {"0", "1"}
    assert (out / "roc.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0
