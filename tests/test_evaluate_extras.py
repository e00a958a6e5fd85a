"""Bootstrap confidence intervals of the pooled out-of-fold metrics, and multi-class summaries end to end."""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from slidesnake.evaluate import METRICS, bootstrap_ci, fold_metrics, metric_values, summarize

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def table(labels, probs, classes, patients=None, fold=0):
    probs = np.asarray(probs, float)
    n = len(labels)
    df = pd.DataFrame({"fold": fold, "slide_id": [f"f{fold}s{i}" for i in range(n)],
                       "patient_id": patients if patients is not None else [f"p{fold}-{i}" for i in range(n)],
                       "label": labels, "split": "test"})
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = probs[:, j]
    df["pred"] = [classes[j] for j in probs.argmax(1)]
    return df


def random_table(n, classes, seed, n_patients=None):
    rng = np.random.default_rng(seed)
    k = len(classes)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    patients = None if n_patients is None else [f"P{i:03d}" for i in rng.integers(0, n_patients, n)]
    return table([classes[i] for i in y], probs, classes, patients)


@pytest.mark.parametrize("classes,seed", [(["neg", "pos"], 0), (["a", "b", "c"], 1), (["a", "b", "c", "d"], 2)])
def test_metric_values_match_fold_metrics(classes, seed):
    for n in (7, 40, -40):  # -40: probabilities rounded, many ties
        df = random_table(abs(n), classes, seed + abs(n))
        if n < 0:
            cols = [f"prob_{c}" for c in classes]
            df[cols] = df[cols].round(1)
        idx = {c: i for i, c in enumerate(classes)}
        fast = metric_values(df["label"].map(idx).to_numpy(), df[[f"prob_{c}" for c in classes]].to_numpy(),
                             df["pred"].map(idx).to_numpy(), len(classes))
        ref = fold_metrics(df, classes)
        for m in METRICS:
            assert fast[m] == pytest.approx(ref[m], nan_ok=True), m
    # a class never predicted and one absent from the labels
    df = table(["a", "a", "b", "b"], [[0.9, 0.1, 0], [0.6, 0.4, 0], [0.3, 0.7, 0], [0.8, 0.2, 0]], ["a", "b", "c"])
    ref = fold_metrics(df, ["a", "b", "c"])
    fast = metric_values(np.array([0, 0, 1, 1]), df[["prob_a", "prob_b", "prob_c"]].to_numpy(),
                         np.array([0, 0, 1, 0]), 3)
    for m in METRICS:
        assert fast[m] == pytest.approx(ref[m]), m


def manual_bootstrap(df, classes, n_bootstrap, seed, unit, level=0.95):
    """The specification, slowly: resample units with the same RNG draws, score with fold_metrics."""
    rng = np.random.default_rng(seed)
    groups = df["patient_id"].astype(str) if unit == "patient" else pd.Series(np.arange(len(df)))
    keys = np.unique(groups)
    members = {k: np.flatnonzero(groups.to_numpy() == k) for k in keys}
    vals = []
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, len(keys), len(keys))
        rows = np.concatenate([members[keys[d]] for d in drawn])
        vals.append(fold_metrics(df.iloc[rows], classes))
    vals = pd.DataFrame(vals)
    out = {}
    for m in METRICS:
        v = vals[m].dropna().to_numpy()
        out[m] = (np.quantile(v, (1 - level) / 2), np.quantile(v, 1 - (1 - level) / 2), len(v))
    return out


@pytest.mark.parametrize("unit", ["patient", "slide"])
@pytest.mark.parametrize("classes", [["neg", "pos"], ["a", "b", "c"]])
def test_bootstrap_matches_the_specification(unit, classes):
    df = random_table(30, classes, seed=5, n_patients=12)
    ci = bootstrap_ci(df, classes, n_bootstrap=60, seed=3, unit=unit).set_index("metric")
    ref = manual_bootstrap(df, classes, 60, 3, unit)
    full = fold_metrics(df, classes)
    assert list(ci.index) == list(METRICS)
    for m in METRICS:
        lo, hi, n_valid = ref[m]
        assert ci.loc[m, "ci_low"] == pytest.approx(lo) and ci.loc[m, "ci_high"] == pytest.approx(hi), m
        assert ci.loc[m, "n_valid"] == n_valid
        assert ci.loc[m, "estimate"] == pytest.approx(full[m])
    assert (ci["unit"] == unit).all() and (ci["n_bootstrap"] == 60).all() and (ci["level"] == 0.95).all()
    assert (ci["n_units"] == (df["patient_id"].nunique() if unit == "patient" else len(df))).all()


def test_patients_are_resampled_as_wholes():
    """Doubling every patient's slide gives the same intervals as resampling the single slides."""
    single = random_table(25, ["neg", "pos"], seed=8)
    single["patient_id"] = [f"P{i:02d}" for i in range(len(single))]
    double = pd.concat([single, single.assign(slide_id=single["slide_id"] + "b")]).reset_index(drop=True)
    a = bootstrap_ci(double, ["neg", "pos"], n_bootstrap=200, seed=1, unit="patient")
    b = bootstrap_ci(single, ["neg", "pos"], n_bootstrap=200, seed=1, unit="slide")
    cols = ["estimate", "ci_low", "ci_high", "n_valid", "n_units"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    # resampling the doubled slides as if independent gives narrower intervals
    c = bootstrap_ci(double, ["neg", "pos"], n_bootstrap=200, seed=1, unit="slide").set_index("metric")
    a = a.set_index("metric")
    assert (c.loc["auc", "ci_high"] - c.loc["auc", "ci_low"]) < (a.loc["auc", "ci_high"] - a.loc["auc", "ci_low"])


def test_bootstrap_defaults_seed_and_undefined_auc():
    df = random_table(40, ["neg", "pos"], seed=2, n_patients=30)
    ci = bootstrap_ci(df, ["neg", "pos"])
    assert (ci["n_bootstrap"] == 1000).all() and (ci["unit"] == "patient").all()
    assert (ci["ci_low"] <= ci["estimate"] + 1e-12).all() and (ci["estimate"] <= ci["ci_high"] + 1e-12).all()
    pd.testing.assert_frame_equal(ci, bootstrap_ci(df, ["neg", "pos"]))
    assert not ci.equals(bootstrap_ci(df, ["neg", "pos"], seed=1))
    # one positive slide among six: many resamples hold a single class, AUC undefined there
    rare = table(["neg"] * 5 + ["pos"], np.c_[np.linspace(0.9, 0.5, 6), np.linspace(0.1, 0.5, 6)], ["neg", "pos"])
    r = bootstrap_ci(rare, ["neg", "pos"], n_bootstrap=300, seed=0).set_index("metric")
    assert 0 < r.loc["auc", "n_valid"] < 300 and r.loc["accuracy", "n_valid"] == 300
    assert r.loc["auc", "estimate"] == 1.0 and r.loc["auc", "ci_low"] == 1.0
    with pytest.raises(ValueError, match="bootstrap unit"):
        bootstrap_ci(df, ["neg", "pos"], unit="fold")
    with pytest.raises(ValueError, match="confidence level"):
        bootstrap_ci(df, ["neg", "pos"], level=95)
    with pytest.raises(ValueError, match="not in classes"):
        bootstrap_ci(df, ["neg", "other"])
    empty = bootstrap_ci(df.iloc[:0], ["neg", "pos"])
    assert len(empty) == len(METRICS) and empty["estimate"].isna().all()


def test_multiclass_summarize_script_end_to_end(tmp_path):
    classes = ["lusc", "luad", "normal"]
    rng = np.random.default_rng(4)
    paths, folds = [], []
    for i in range(3):
        y = np.arange(12) % 3
        logits = rng.normal(size=(12, 3)) + 2.0 * np.eye(3)[y]
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        df = table([classes[j] for j in y], probs, classes, patients=[f"p{i}-{j // 2}" for j in range(12)], fold=i)
        train = table([classes[j] for j in y[:3]], probs[:3], classes, fold=i).assign(
            split="train", slide_id=lambda d: d["slide_id"] + "t")
        folds.append(df)
        paths.append(tmp_path / f"fold_{i}" / "predictions.csv")
        paths[-1].parent.mkdir()
        pd.concat([df, train]).to_csv(paths[-1], index=False)
    out = tmp_path / "summary"
    sm = SimpleNamespace(
        input=SimpleNamespace(predictions=[str(p) for p in paths]),
        params=SimpleNamespace(classes=classes, evaluation={"n_bootstrap": 200, "ci_level": 0.9, "seed": 0,
                                                            "bootstrap_unit": "patient"}),
        output=SimpleNamespace(summary=str(out / "summary.csv"), summary_ci=str(out / "summary_ci.csv"),
                               predictions=str(out / "predictions.csv"), roc=str(out / "roc.png"),
                               confusion=str(out / "confusion.png")),
        log=[str(tmp_path / "summarize.log")],
    )
    runpy.run_path(str(SCRIPTS / "summarize.py"), init_globals={"snakemake": sm})
    summary = pd.read_csv(out / "summary.csv", dtype={"fold": str})
    for i, df in enumerate(folds):
        y = df["label"].map({c: j for j, c in enumerate(classes)}).to_numpy()
        expected = roc_auc_score(y, df[[f"prob_{c}" for c in classes]].to_numpy(), multi_class="ovr", average="macro")
        assert summary.loc[i, "auc"] == pytest.approx(expected)
    oof = pd.read_csv(out / "predictions.csv", dtype={"label": str, "pred": str, "patient_id": str})
    assert len(oof) == 36 and set(oof["label"]) == set(classes)
    ci = pd.read_csv(out / "summary_ci.csv").set_index("metric")
    pooled = pd.concat(folds)
    y = pooled["label"].map({c: j for j, c in enumerate(classes)}).to_numpy()
    assert ci.loc["auc", "estimate"] == pytest.approx(
        roc_auc_score(y, pooled[[f"prob_{c}" for c in classes]].to_numpy(), multi_class="ovr", average="macro"))
    assert (ci["level"] == 0.9).all() and (ci["unit"] == "patient").all() and (ci["n_units"] == 18).all()
    assert (ci["ci_low"] <= ci["ci_high"]).all() and ci.loc["auc", "n_valid"] == 200
    pd.testing.assert_frame_equal(ci.reset_index(), bootstrap_ci(summarize(folds, classes)[1], classes,
                                                                   n_bootstrap=200, level=0.9), check_dtype=False)
    for name in ("roc.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pooled OOF AUC" in (tmp_path / "summarize.log").read_text()
