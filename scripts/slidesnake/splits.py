"""Patient-level stratified cross-validation folds.

``k`` folds from scikit-learn's ``StratifiedGroupKFold`` (groups = patients, y = label). Fold ``i``
uses group ``i`` as ``test``, group ``(i + 1) % k`` as ``val`` (early stopping) and the rest as
``train``, so every slide is tested exactly once and no patient crosses partitions within a fold.
Output (long format, see docs/design.md): ``fold, slide_id, patient_id, label, split``.
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


def make_splits(
    samples: pd.DataFrame, k: int = 5, seed: int = 0, classes: Sequence | None = None
) -> pd.DataFrame:
    """Assign every slide to train/val/test in each of ``k`` patient-level stratified folds.

    ``samples`` needs columns ``slide_id, patient_id, label`` (others are ignored). The result does
    not depend on the row order of ``samples``: rows are sorted by patient and slide first.
    ``classes`` (optional) restricts the allowed labels and requires each to be present.
    """
    _require_columns(samples, SAMPLE_COLUMNS, "sample sheet")
    k = int(k)
    if k < 3:
        raise SplitError(f"splits.k must be >= 3 (test, val and train groups); got {k}")
    df = samples.loc[:, list(SAMPLE_COLUMNS)].reset_index(drop=True)
    empty = (df.isna() | (df.astype(str).apply(lambda c: c.str.strip()) == "")).any(axis=1)
    if empty.any():
        lines = [i + 2 for i in np.flatnonzero(empty.to_numpy())[:5]]
        raise SplitError(f"empty slide_id/patient_id/label on sample sheet line(s) {lines}")
    df = df.astype(str)
    if classes is not None:
        validate_labels(df, classes)
    dup = df["slide_id"][df["slide_id"].duplicated()]
    if len(dup):
        raise SplitError(f"duplicate slide_id(s) in sample sheet: {sorted(set(dup))[:10]}")

    per_patient = df.groupby("patient_id")["label"].nunique()
    mixed = per_patient.index[per_patient > 1].tolist()
    if mixed:
        log.warning("patients with slides of more than one label (kept together): %s", mixed[:10])

    patients_per_class = df.groupby("label")["patient_id"].nunique()
    if classes is not None:
        patients_per_class = patients_per_class.reindex([str(c) for c in classes], fill_value=0)
    counts = ", ".join(f"{c}: {n}" for c, n in patients_per_class.items())
    small = patients_per_class[patients_per_class < k]
    if len(small):
        raise SplitError(
            f"cannot make {k} patient-level folds: class(es) {list(small.index)} have fewer than "
            f"k={k} patients (patients per class: {counts}); lower `splits.k` to at most "
            f"{int(patients_per_class.min())} or add patients"
        )

    df = df.sort_values(["patient_id", "slide_id"], kind="mergesort").reset_index(drop=True)
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed))
    group = np.full(len(df), -1, dtype=int)
    for i, (_, test_idx) in enumerate(sgkf.split(np.zeros(len(df)), df["label"], df["patient_id"])):
        group[test_idx] = i
    assert (group >= 0).all()

    parts = []
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


def check_splits(df: pd.DataFrame, complete: bool = True) -> None:
    """Raise ``SplitError`` if a splits table breaks the contract.

    Always: required columns, known split names, a slide at most once per fold, no patient in two
    partitions of a fold, non-empty train and val in every fold, a slide's label the same in all
    folds. With ``complete`` (the whole table, not one fold's rows): folds ``0..k-1`` all present
    with the same slides, a non-empty test in every fold and every slide tested exactly once.
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
    tested = df.loc[df["split"] == "test", "slide_id"].value_counts()
    if len(tested) != len(slides) or (tested != 1).any():
        never = sorted(slides - set(tested.index))[:10]
        twice = tested.index[tested > 1].tolist()[:10]
        raise SplitError(f"every slide must be tested exactly once; never: {never}, more than once: {twice}")
