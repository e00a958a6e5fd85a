"""Every flat-bag model of the zoo trains per fold through Snakemake, and the fixed held-out test
scheme (splits.test_fraction) runs end to end. Each case starts from a copy of the small completed
run (tests/smallrun.py: 6 patients, k = 3, abmil) and reuses its tiles and features; abmil itself,
cma_mil and hier_multistain run end to end in test_workflow.py and test_workflow_structured.py."""

from __future__ import annotations

import pandas as pd
import pytest

from test_reruns import copy_run, edit_config
from test_workflow import K, snakemake

pytestmark = pytest.mark.slow  # left out of make test-fast

FEATURES_RULES = ("tile", "filter_tissue", "extract_features")


def _ran(proc) -> str:
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("model", ["clam", "transmil", "da_mil"])
def test_model_trains_every_fold_through_snakemake(small_run, tmp_path, model):
    work = copy_run(small_run, tmp_path / "run")
    splits_before = (work / "results/splits/splits.csv").read_bytes()
    mtime_before = (work / "results/splits/splits.csv").stat().st_mtime_ns
    sheet = pd.read_csv(work / "cohort" / "samples.tsv", sep="\t", dtype=str)
    edit_config(work, "training", model=model)
    one = sheet["slide_id"].iloc[0]
    proc = snakemake(work, "--cores", "2", f"results/summary/{model}/summary.csv",
                     f"results/heatmaps/{model}/{one}.png")
    log = _ran(proc)
    for rule in FEATURES_RULES:  # the features are reused, the saved splits too
        assert f"rule {rule}:" not in log
    assert "rule make_splits:" not in log
    assert (work / "results/splits/splits.csv").read_bytes() == splits_before
    assert (work / "results/splits/splits.csv").stat().st_mtime_ns == mtime_before

    summary = pd.read_csv(work / f"results/summary/{model}/summary.csv")
    assert summary["fold"].astype(str).tolist() == [*map(str, range(K)), "mean", "sd"]
    assert (summary["n"].iloc[:K] > 0).all()
    oof = pd.read_csv(work / f"results/summary/{model}/predictions.csv", dtype={"slide_id": str})
    assert sorted(oof["slide_id"]) == sorted(sheet["slide_id"])  # every slide tested once
    for fold in range(K):
        d = work / f"results/models/{model}/fold_{fold}"
        hist = pd.read_csv(d / "history.csv")
        assert len(hist) >= 1 and hist["train_loss"].notna().all()
        assert (d / "model.pt").stat().st_size > 0
    # the loss terms the model is named for were optimised (history has a column per named term)
    terms = {"clam": ["train_bag", "train_instance"], "transmil": ["train_ce"],
             "da_mil": ["train_ce_slide", "train_ce_sub", "train_ce_neg", "train_contrastive"]}[model]
    assert set(terms) <= set(hist.columns), hist.columns.tolist()
    assert hist[terms].notna().all().all()
    tiles = pd.read_csv(work / f"results/heatmaps/{model}/{one}.tiles.csv")
    assert len(tiles) > 0 and tiles["attention"].notna().all()


def test_fixed_held_out_test_set_end_to_end(small_run, tmp_path):
    """splits.test_fraction: one test set scored by every fold model and by their ensemble; the
    heatmap of a held-out slide comes from the ensemble."""
    work = copy_run(small_run, tmp_path / "run")
    edit_config(work, "splits", k=2, test_fraction=0.34)  # 6 patients: 2 held out, 2 folds of the other 4
    proc = snakemake(work, "--cores", "2", "results/summary/abmil/summary.csv")
    assert "rule make_splits:" in _ran(proc)
    splits = pd.read_csv(work / "results/splits/splits.csv", dtype=str)
    test = splits[splits["split"] == "test"]
    held = set(test["slide_id"])
    assert len(held) == 2 and test.groupby("fold")["slide_id"].apply(set).map(lambda s: s == held).all()
    assert set(test["label"]) == {"normal", "tumour"}
    trained = set(splits.loc[splits["split"].isin(["train", "val"]), "slide_id"])
    assert not held & trained

    summary = pd.read_csv(work / "results/summary/abmil/summary.csv")
    assert summary["fold"].astype(str).tolist() == ["0", "1", "mean", "sd", "ensemble"]
    assert (summary["n"].iloc[:2] == 2).all()
    ens = pd.read_csv(work / "results/summary/abmil/predictions.csv", dtype={"slide_id": str})
    assert set(ens["slide_id"]) == held and (ens["n_folds"] == 2).all()
    for c in ("normal", "tumour"):
        folds = ens[[f"fold0_prob_{c}", f"fold1_prob_{c}"]].mean(axis=1)
        pd.testing.assert_series_equal(ens[f"prob_{c}"], folds, check_names=False)
        fold0 = pd.read_csv(work / "results/models/abmil/fold_0/predictions.csv", dtype={"slide_id": str})
        fold0 = fold0[fold0["split"] == "test"].set_index("slide_id")[f"prob_{c}"]
        assert ens.set_index("slide_id")[f"fold0_prob_{c}"].to_dict() == pytest.approx(fold0.to_dict())
    ci = pd.read_csv(work / "results/summary/abmil/summary_ci.csv")
    assert ci.set_index("metric").loc["auc", "n_units"] == 2

    slide = sorted(held)[0]
    snakemake(work, "--cores", "2", f"results/heatmaps/abmil/{slide}.png")
    log = (work / f"results/logs/heatmap/abmil/{slide}.log").read_text()
    assert "ensemble of folds [0, 1]" in log
