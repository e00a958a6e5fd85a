"""Patient-level stratified cross-validation folds.

Two schemes, both from scikit-learn's ``StratifiedGroupKFold`` (groups = patients, y = label):

* cross-validation (``test_fraction`` 0, the default): ``k`` groups; fold ``i`` uses group ``i`` as
  ``test``, group ``(i + 1) % k`` as ``val`` (early stopping) and the rest as ``train``, so every slide
  is tested exactly once (out-of-fold predictions); 60/20/20 for k = 5.
* fixed held-out test set (``test_fraction`` f > 0): first a patient-level stratified test set of
  about f of the patients (one group of ``round(1 / f)``), the same ``test`` in every fold and never
  trained or early-stopped on; the other patients form ``k`` groups, fold ``i`` validating on group
  ``i`` and training on the rest (60/20/20 for f = 0.2, k = 4). Every fold model is evaluated on the
  same test set, and the fold ensemble (mean probability) gives the cohort prediction.

No patient crosses partitions within a fold. Output (long format, see docs/design.md):
``fold, slide_id, patient_id, label, split``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

log = logging.getLogger("slidesnake.splits")

SPLITS = ("train", "val", "test")
SAMPLE_COLUMNS = ("slide_id", "patient_id", "label")
SPLIT_COLUMNS = ("fold", "slide_id", "patient_id", "label", "split")


class SplitError(ValueError):
    """The sample sheet cannot be split, or a splits table breaks the contract."""


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SplitError(f"{what} lacks column(s) {missing}; has {list(df.columns)}")


def validate_labels(samples: pd.DataFrame, classes: Sequence) -> None:
    """Every label must be one of ``classes``; the error names the first offending rows.

    Rows are numbered as lines of the sample sheet (header = line 1, no comment lines).
    """
    classes = [str(c) for c in classes]
    labels = samples["label"].astype(str)
    bad = ~labels.isin(classes)
    if bad.any():
        rows = [
            f"line {i + 2} (slide {samples['slide_id'].iloc[i]!r}: label {labels.iloc[i]!r})"
            for i in np.flatnonzero(bad.to_numpy())[:5]
        ]
        more = f" and {int(bad.sum()) - 5} more" if bad.sum() > 5 else ""
        raise SplitError(
            f"label not in classes {classes}: {', '.join(rows)}{more}; "
            "fix the sample sheet or the `classes` config"
        )


def _groups(df: pd.DataFrame, n: int, seed: int) -> np.ndarray:
    """Group index (0..n-1) of every row: ``StratifiedGroupKFold`` test groups, patients kept whole."""
    sgkf = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=int(seed))
    group = np.full(len(df), -1, dtype=int)
    # site-preserved folds group whole sites ("site" column, see make_splits); else patients
    groups = df["site"] if "site" in df.columns else df["patient_id"]
    for i, (_, idx) in enumerate(sgkf.split(np.zeros(len(df)), df["label"], groups)):
        group[idx] = i
    assert (group >= 0).all()
    return group


def make_splits(
    samples: pd.DataFrame, k: int = 5, seed: int = 0, classes: Sequence | None = None,
    test_fraction: float = 0.0, site_preserved: bool = False,
) -> pd.DataFrame:
    """Assign every slide to train/val/test in each of ``k`` patient-level stratified folds.

    ``samples`` needs columns ``slide_id, patient_id, label`` (others are ignored). The result does
    not depend on the row order of ``samples``: rows are sorted by patient and slide first.
    ``classes`` (optional) restricts the allowed labels and requires each to be present.
    ``test_fraction`` > 0 holds out a fixed test set of about that fraction of the patients (see the
    module docstring); it must be below 0.5. ``site_preserved`` keeps every ``site`` (sheet column:
    hospital, scanner, lab) whole in one partition of each fold, as slideflow's site-preserved
    cross-validation does, so a model is always tested on sites it never trained on.
    """
    _require_columns(samples, SAMPLE_COLUMNS, "sample sheet")
    k = int(k)
    test_fraction = float(test_fraction or 0.0)
    if not 0 <= test_fraction < 0.5:
        raise SplitError(f"splits.test_fraction must be in [0, 0.5); got {test_fraction}")
    held_out = round(1 / test_fraction) if test_fraction > 0 else 0
    if k < (2 if held_out else 3):
        raise SplitError(f"splits.k must be >= 3 (test, val and train groups), or >= 2 with a "
                         f"test_fraction (val and train groups); got {k}")
    df = samples.loc[:, list(SAMPLE_COLUMNS)].reset_index(drop=True)
    empty = (df.isna() | (df.astype(str).apply(lambda c: c.str.strip()) == "")).any(axis=1)
    if empty.any():
        lines = [i + 2 for i in np.flatnonzero(empty.to_numpy())[:5]]
        raise SplitError(f"empty slide_id/patient_id/label on sample sheet line(s) {lines}")
    df = df.astype(str)
    if site_preserved:
        df["site"] = _sites(samples)
    if classes is not None:
        validate_labels(df, classes)
    dup = df["slide_id"][df["slide_id"].duplicated()]
    if len(dup):
        raise SplitError(f"duplicate slide_id(s) in sample sheet: {sorted(set(dup))[:10]}")

    per_patient = df.groupby("patient_id")["label"].nunique()
    mixed = per_patient.index[per_patient > 1].tolist()
    if mixed:
        log.warning("patients with slides of more than one label (kept together): %s", mixed[:10])

    unit = "site" if site_preserved else "patient_id"
    patients_per_class = df.groupby("label")[unit].nunique()
    if classes is not None:
        patients_per_class = patients_per_class.reindex([str(c) for c in classes], fill_value=0)
    counts = ", ".join(f"{c}: {n}" for c, n in patients_per_class.items())
    # every class needs a patient in the test set and in each of the k validation groups
    needed = k + 1 if held_out else k
    small = patients_per_class[patients_per_class < needed]
    if len(small):
        what = f"a held-out test set and {k} folds" if held_out else f"{k} patient-level folds"
        raise SplitError(
            f"cannot make {what}: class(es) {list(small.index)} have fewer than {needed} "
            f"{'sites' if site_preserved else 'patients'} ({'sites' if site_preserved else 'patients'} per "
            f"class: {counts}); lower `splits.k`"
            f"{' or set splits.test_fraction: 0' if held_out else ''}"
            f"{' or set splits.site_preserved: false' if site_preserved else ' or add patients'}"
        )

    df = df.sort_values(["patient_id", "slide_id"], kind="mergesort").reset_index(drop=True)
    parts = []
    if held_out:
        test = _groups(df, held_out, seed) == 0
        rest = df[~test].reset_index(drop=True)
        group = _groups(rest, k, seed)
        for fold in range(k):
            parts.append(df[test].assign(fold=fold, split="test"))
            parts.append(rest.assign(fold=fold, split=np.where(group == fold, "val", "train")))
    else:
        group = _groups(df, k, seed)
        for fold in range(k):
            split = np.where(group == fold, "test", np.where(group == (fold + 1) % k, "val", "train"))
            parts.append(df.assign(fold=fold, split=split))
    out = pd.concat(parts, ignore_index=True).loc[:, list(SPLIT_COLUMNS)]
    out = out.sort_values(["fold", "slide_id"], kind="mergesort").reset_index(drop=True)
    check_splits(out)
    for fold, g in out.groupby("fold"):
        parts = []
        for name in SPLITS:
            counts = g.loc[g["split"] == name, "label"].value_counts().sort_index()
            parts.append(f"{name} {int(counts.sum())} slides ({', '.join(f'{c}={n}' for c, n in counts.items())})")
        log.info("fold %d: %s", fold, "; ".join(parts))
    return out


def _sites(samples: pd.DataFrame) -> pd.Series:
    """The sheet's ``site`` column (for site-preserved folds): present, non-empty, one site per patient."""
    if "site" not in samples.columns:
        raise SplitError("splits.site_preserved needs a 'site' column in the sample sheet; add it or set "
                         "splits.site_preserved: false")
    site = samples["site"].reset_index(drop=True)
    empty = site.isna() | (site.astype(str).str.strip() == "")
    if empty.any():
        lines = [i + 2 for i in np.flatnonzero(empty.to_numpy())[:5]]
        raise SplitError(f"empty site on sample sheet line(s) {lines}; fill the 'site' column")
    site = site.astype(str)
    per_patient = pd.Series(site.to_numpy(), index=samples["patient_id"].astype(str)).groupby(level=0).nunique()
    split = per_patient.index[per_patient > 1].tolist()
    if split:
        raise SplitError(f"patient(s) {split[:5]} have slides from more than one site; fix the 'site' column")
    return site


def check_splits(df: pd.DataFrame, complete: bool = True) -> None:
    """Raise ``SplitError`` if a splits table breaks the contract.

    Always: required columns, known split names, a slide at most once per fold, no patient in two
    partitions of a fold, non-empty train and val in every fold, a slide's label the same in all
    folds. With ``complete`` (the whole table, not one fold's rows): folds ``0..k-1`` all present
    with the same slides, a non-empty test in every fold, and either every slide tested exactly once
    (cross-validation) or one fixed test set, the same in every fold, whose slides are never
    trained or validated on (:func:`fixed_test_set`).
    """
    _require_columns(df, SPLIT_COLUMNS, "splits table")
    if df.empty:
        raise SplitError("splits table is empty")
    unknown = sorted(set(df["split"]) - set(SPLITS))
    if unknown:
        raise SplitError(f"unknown split name(s) {unknown}; expected {list(SPLITS)}")
    if df[list(SPLIT_COLUMNS)].isna().any().any():
        raise SplitError("splits table has missing values")
    labels = df.groupby("slide_id")["label"].nunique()
    if (labels > 1).any():
        raise SplitError(f"slide(s) with different labels across folds: {labels.index[labels > 1].tolist()[:10]}")
    for fold, g in df.groupby("fold"):
        dup = g["slide_id"][g["slide_id"].duplicated()]
        if len(dup):
            raise SplitError(f"fold {fold}: slide(s) listed twice: {sorted(set(dup))[:10]}")
        parts = g.groupby("patient_id")["split"].nunique()
        leaked = parts.index[parts > 1].tolist()
        if leaked:
            detail = {p: sorted(set(g.loc[g["patient_id"] == p, "split"])) for p in leaked[:5]}
            raise SplitError(f"fold {fold}: patient(s) in more than one partition: {detail}")
        for s in ("train", "val"):
            if not (g["split"] == s).any():
                raise SplitError(f"fold {fold}: empty {s} split")
    if not complete:
        return
    folds = sorted(int(f) for f in df["fold"].unique())
    k = len(folds)
    if folds != list(range(k)):
        raise SplitError(f"folds must be 0..k-1; got {folds}")
    slides = set(df["slide_id"])
    for fold, g in df.groupby("fold"):
        if set(g["slide_id"]) != slides:
            raise SplitError(f"fold {fold} does not list every slide")
        if not (g["split"] == "test").any():
            raise SplitError(f"fold {fold}: empty test split")
    held_out = fixed_test_set(df)
    if held_out is not None:
        val = df.loc[df["split"] == "val", "slide_id"].value_counts()
        rest = slides - held_out
        if set(val.index) != rest or (val != 1).any():
            raise SplitError("with a fixed test set every other slide must be validated exactly once; "
                             f"never: {sorted(rest - set(val.index))[:10]}, more than once: "
                             f"{val.index[val > 1].tolist()[:10]}")
        return
    tested = df.loc[df["split"] == "test", "slide_id"].value_counts()
    if len(tested) != len(slides) or (tested != 1).any():
        never = sorted(slides - set(tested.index))[:10]
        twice = tested.index[tested > 1].tolist()[:10]
        raise SplitError(f"every slide must be tested exactly once; never: {never}, more than once: {twice}")


def fixed_test_set(df: pd.DataFrame) -> set[str] | None:
    """The held-out test slides when every fold of ``df`` tests the same slides (``test_fraction``
    scheme, k >= 2), else None (cross-validation: each fold tests its own group)."""
    tests = [frozenset(g.loc[g["split"] == "test", "slide_id"]) for _, g in df.groupby("fold")]
    if len(tests) < 2 or not tests[0] or any(t != tests[0] for t in tests):
        return None
    return set(tests[0])


def read_splits(path) -> pd.DataFrame:
    """``splits.csv`` with its ids and labels as strings."""
    return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "label": str})
