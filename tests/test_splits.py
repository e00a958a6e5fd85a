"""Patient-level stratified folds (slidesnake.splits) and the make_splits rule script."""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from slidesnake.splits import SplitError, check_splits, fixed_test_set, make_splits

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def cohort(n_patients=(25, 15), seed=0, classes=("normal", "tumour")) -> pd.DataFrame:
    """Patients with 1-3 slides each; labels per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    pid = 0
    for label, n in zip(classes, n_patients):
        for _ in range(n):
            for s in range(rng.integers(1, 4)):
                rows.append(dict(slide_id=f"S{pid:03d}-{s}", patient_id=f"P{pid:03d}", label=label,
                                 path=f"/x/{pid}-{s}.svs"))
            pid += 1
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)


def test_patient_disjoint_and_every_slide_tested_once():
    samples = cohort()
    df = make_splits(samples, k=5, seed=0)
    assert list(df.columns) == ["fold", "slide_id", "patient_id", "label", "split"]
    assert sorted(df["fold"].unique()) == list(range(5))
    for fold, g in df.groupby("fold"):
        assert len(g) == len(samples) and set(g["slide_id"]) == set(samples["slide_id"])
        parts = {s: set(g.loc[g["split"] == s, "patient_id"]) for s in ("train", "val", "test")}
        assert all(parts.values())
        assert not parts["train"] & parts["val"]
        assert not parts["train"] & parts["test"]
        assert not parts["val"] & parts["test"]
    tested = df[df["split"] == "test"]["slide_id"]
    assert tested.is_unique and set(tested) == set(samples["slide_id"])
    # fold i's val group is fold (i+1)'s test group
    for i in range(5):
        val = set(df[(df["fold"] == i) & (df["split"] == "val")]["slide_id"])
        test_next = set(df[(df["fold"] == (i + 1) % 5) & (df["split"] == "test")]["slide_id"])
        assert val == test_next


def test_stratified_roughly():
    samples = cohort((30, 20, 10), classes=("a", "b", "c"))
    df = make_splits(samples, k=5, seed=3)
    pat = samples.drop_duplicates("patient_id")
    overall = pat["label"].value_counts(normalize=True)
    for _, g in df[df["split"] == "test"].groupby("fold"):
        frac = g.drop_duplicates("patient_id")["label"].value_counts(normalize=True)
        for c in overall.index:
            assert abs(frac.get(c, 0) - overall[c]) < 0.15, (c, frac.to_dict(), overall.to_dict())
        n_pat = g["patient_id"].nunique()
        assert 0.1 * 60 <= n_pat <= 0.3 * 60  # ~20 % of 60 patients per test group


def test_deterministic_and_independent_of_row_order():
    samples = cohort()
    a = make_splits(samples, k=5, seed=7)
    b = make_splits(samples.sample(frac=1, random_state=1), k=5, seed=7)
    pd.testing.assert_frame_equal(a, b)
    c = make_splits(samples, k=5, seed=8)
    assert not a.equals(c)


def test_too_few_patients_in_a_class():
    samples = cohort((10, 3))
    with pytest.raises(SplitError) as e:
        make_splits(samples, k=5)
    msg = str(e.value)
    assert "normal: 10" in msg and "tumour: 3" in msg and "splits.k" in msg
    assert make_splits(samples, k=3)["fold"].nunique() == 3


def test_labels_outside_classes_and_missing_class():
    samples = cohort()
    samples.loc[4, "label"] = "weird"
    with pytest.raises(SplitError, match=rf"line 6 \(slide '{samples.loc[4, 'slide_id']}': label 'weird'\)"):
        make_splits(samples, k=5, classes=["normal", "tumour"])
    with pytest.raises(SplitError, match="other: 0"):
        make_splits(cohort(), k=5, classes=["normal", "tumour", "other"])


def test_bad_inputs():
    with pytest.raises(SplitError, match="k must be >= 3"):
        make_splits(cohort(), k=2)
    dup = pd.concat([cohort(), cohort().iloc[:1]])
    with pytest.raises(SplitError, match="duplicate slide_id"):
        make_splits(dup)
    with pytest.raises(SplitError, match="lacks column"):
        make_splits(cohort().drop(columns="patient_id"))


def test_check_splits_rejects_leaks():
    df = make_splits(cohort(), k=5)
    check_splits(df)
    leak = df.copy()
    # move one slide of a multi-slide test patient of fold 0 into train
    g = leak[(leak["fold"] == 0) & (leak["split"] == "test")]
    pid = g["patient_id"].value_counts().index[0]
    assert (g["patient_id"] == pid).sum() > 1
    leak.loc[g.index[g["patient_id"] == pid][0], "split"] = "train"
    with pytest.raises(SplitError, match="more than one partition"):
        check_splits(leak)
    with pytest.raises(SplitError, match="tested exactly once|does not list"):
        check_splits(df[~((df["fold"] == 1) & (df["split"] == "test"))])
    check_splits(df[df["fold"] == 2], complete=False)


def test_make_splits_script(tmp_path):
    sheet = tmp_path / "samples.tsv"
    samples = cohort()
    sheet.write_text("# a comment line\n" + samples.to_csv(sep="\t", index=False))
    out = tmp_path / "splits" / "splits.csv"
    sm = SimpleNamespace(input=SimpleNamespace(samples=str(sheet)), output=SimpleNamespace(splits=str(out)),
                         params=SimpleNamespace(k=4, seed=0, classes=["normal", "tumour"]), log=[])
    runpy.run_path(str(SCRIPTS / "make_splits.py"), init_globals={"snakemake": sm})
    df = pd.read_csv(out, dtype={"slide_id": str, "patient_id": str})
    check_splits(df)
    pd.testing.assert_frame_equal(df, make_splits(samples, k=4, seed=0))


def test_fixed_test_fraction_is_held_out_of_every_fold():
    """splits.test_fraction: one patient-level stratified test set, the same in every fold, never
    trained or validated on; the rest validated exactly once (60/20/20 for 0.2 and k = 4)."""
    samples = cohort((30, 20))
    df = make_splits(samples, k=4, seed=1, test_fraction=0.2)
    test = fixed_test_set(df)
    assert test is not None
    for fold, g in df.groupby("fold"):
        assert set(g.loc[g["split"] == "test", "slide_id"]) == test
        parts = {s: set(g.loc[g["split"] == s, "patient_id"]) for s in ("train", "val", "test")}
        assert not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
        assert not parts["train"] & parts["val"]
    held = samples[samples["slide_id"].isin(test)].drop_duplicates("patient_id")
    assert set(samples.loc[samples["patient_id"].isin(held["patient_id"]), "slide_id"]) == test  # whole patients
    assert 0.15 <= len(held) / samples["patient_id"].nunique() <= 0.25
    assert set(held["label"]) == {"normal", "tumour"}  # stratified: both classes held out
    val = df.loc[df["split"] == "val", "slide_id"]
    assert val.is_unique and set(val) == set(samples["slide_id"]) - test
    check_splits(df)
    # deterministic, and the cross-validation scheme is unchanged by the new option's default
    pd.testing.assert_frame_equal(df, make_splits(samples.sample(frac=1, random_state=3), k=4, seed=1,
                                                  test_fraction=0.2))
    pd.testing.assert_frame_equal(make_splits(samples, k=4, seed=1), make_splits(samples, k=4, seed=1,
                                                                                  test_fraction=0))
    assert fixed_test_set(make_splits(samples, k=4, seed=1)) is None


def test_fixed_test_set_contract_and_limits():
    samples = cohort((30, 20))
    df = make_splits(samples, k=3, seed=0, test_fraction=0.25)
    # a held-out patient trained on in one fold breaks the contract
    bad = df.copy()
    i = bad.index[(bad["fold"] == 1) & (bad["split"] == "test")][0]
    bad.loc[(bad["fold"] == 1) & (bad["patient_id"] == bad.loc[i, "patient_id"]), "split"] = "train"
    with pytest.raises(SplitError, match="tested exactly once"):
        check_splits(bad)
    # and so does one validated in two folds
    bad = df.copy()
    j = bad.index[(bad["fold"] == 0) & (bad["split"] == "val")][0]
    bad.loc[(bad["fold"] == 1) & (bad["patient_id"] == bad.loc[j, "patient_id"]), "split"] = "val"
    with pytest.raises(SplitError, match="validated exactly once"):
        check_splits(bad)
    with pytest.raises(SplitError, match="test_fraction must be in"):
        make_splits(samples, k=3, test_fraction=0.5)
    with pytest.raises(SplitError, match="held-out test set"):
        make_splits(cohort((4, 20)), k=4, test_fraction=0.2)
    assert fixed_test_set(make_splits(cohort((4, 20)), k=3, test_fraction=0.2)) is not None


def test_excluded_slides_hold_no_place_in_the_folds(tmp_path):
    """Rule make_splits reads qc/excluded.tsv: the folds are made from the slides trained on; too few
    patients left for k is one line naming splits.k and the counts after the exclusions."""
    from slidesnake.config import ConfigError

    samples = cohort(n_patients=(6, 5))
    sheet = tmp_path / "samples.tsv"
    samples.to_csv(sheet, sep="\t", index=False)
    gone = samples.loc[samples["label"] == "tumour", "slide_id"].iloc[:2].tolist()
    excluded = tmp_path / "excluded.tsv"
    pd.DataFrame({"slide_id": gone, "patient_id": "-", "path": "-", "stage": "tile",
                  "reason": "file is empty (0 bytes)", "fix": "-"}).to_csv(excluded, sep="\t", index=False)
    out = tmp_path / "splits.csv"

    def run(k):
        sm = SimpleNamespace(input=SimpleNamespace(samples=str(sheet), excluded=str(excluded)),
                             output=SimpleNamespace(splits=str(out)),
                             params=SimpleNamespace(k=k, seed=0, classes=["normal", "tumour"], test_fraction=0),
                             log=[str(tmp_path / f"make_splits_{k}.log")])
        runpy.run_path(str(SCRIPTS / "make_splits.py"), init_globals={"snakemake": sm})

    run(3)
    df = pd.read_csv(out, dtype=str)
    assert set(df["slide_id"]) == set(samples["slide_id"]) - set(gone)
    check_splits(df.astype({"fold": int}))
    log = (tmp_path / "make_splits_3.log").read_text()
    assert all(f"not in the folds: {s} (excluded at tile: file is empty (0 bytes))" in log for s in gone)
    left = samples[~samples["slide_id"].isin(gone)].groupby("label")["patient_id"].nunique()["tumour"]
    with pytest.raises(ConfigError, match=rf"config splits.k: {left + 1} folds need {left + 1} patients .* "
                                          rf"after leaving out the 2 slide\(s\) of .*set splits.k to at most {left}"):
        run(left + 1)
