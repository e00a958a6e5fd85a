"""Digit bags (MNIST-bags, Ilse et al. 2018, from scikit-learn's 8x8 digits): the one generator of the
training, model-zoo, tuning and structured-model tests, in three shapes -- flat bags of digits,
multiscale bags (digits on three nested scales) and cases of two "stains" x slices.

Every shape draws the same way: one half of the images feeds the train and val bags, the other
half the test bags; half of the bags (every even one) are positive, holding 1-3 nines.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits

from slidesnake.bags import CaseBag, multiscale_bag
from slidesnake.tiling import parent_indices

CLASSES = ["other", "nine"]
MAGS = (5.0, 10.0, 20.0)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digit images as 64-d float32 vectors in [0, 1], and their digits."""
    X, t = load_digits(return_X_y=True)
    return (X / 16.0).astype(np.float32), t


# One bag: (rng, images, digits, nines, others, index, positive, name) -> (bags, instance labels, splits rows).
BagMaker = Callable[..., tuple[dict, dict, list[dict]]]


def _generate(make: BagMaker, n_train: int, n_val: int, n_test: int, seed: int):
    X, t = digits()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    pools = {"train": perm[: len(X) // 2], "test": perm[len(X) // 2:]}
    bags, inst, rows = {}, {}, []
    for split, n_bags in (("train", n_train), ("val", n_val), ("test", n_test)):
        pool = pools["test" if split == "test" else "train"]
        nines, others = pool[t[pool] == 9], pool[t[pool] != 9]
        for b in range(n_bags):
            name, positive = f"{split}{b:03d}", b % 2 == 0
            bag, labels, bag_rows = make(rng, X, t, nines, others, positive, name)
            bags.update(bag)
            inst.update(labels)
            rows += [dict(fold=0, label=CLASSES[int(positive)], split=split, **r) for r in bag_rows]
    return bags, inst, pd.DataFrame(rows)[["fold", "slide_id", "patient_id", "label", "split"]]


def _flat(rng, X, t, nines, others, positive, sid):
    n = max(2, int(round(rng.normal(10, 2))))
    idx = rng.choice(others, n)
    if positive:
        where = rng.choice(n, min(n, int(rng.integers(1, 4))), replace=False)
        idx[where] = rng.choice(nines, len(where))
    return {sid: X[idx]}, {sid: t[idx] == 9}, [dict(slide_id=sid, patient_id=f"p-{sid}")]


def digit_bags(n_train=200, n_val=50, n_test=100, seed=0):
    """Flat bags: sizes ~ Normal(10, 2) clipped to >= 2; a positive bag holds 1-3 nines."""
    return _generate(_flat, n_train, n_val, n_test, seed)


class FakeStore:
    """What multiscale_bag reads of a FeatureStore: features, coords and size per magnification."""

    def __init__(self, groups: dict):
        self.groups, self.path = groups, "fake.zarr"
        self.magnifications = sorted(groups)

    def features(self, m):
        return self.groups[m]["features"]

    def coords(self, m):
        return self.groups[m]["coords"]

    def size(self, m):
        return self.groups[m]["size"]


def nested_groups(fine: np.ndarray, n_coarse: int, rng: np.random.Generator | None = None, drop: float = 0.0):
    """Three nested scales over ``n_coarse`` 5x tiles in a row (level-0 side 4 / 2 / 1): every 10x
    tile is the mean of its four 20x children, every 5x tile the mean of its four 10x tiles. With
    ``drop``, that share of the 10x tiles is then removed (filtered out: their children lose the parent)."""
    xy20 = np.array([(4 * c + i, j) for c in range(n_coarse) for j in range(4) for i in range(4)])
    xy10 = np.array([(4 * c + 2 * i, 2 * j) for c in range(n_coarse) for j in range(2) for i in range(2)])
    xy5 = np.array([(4 * c, 0) for c in range(n_coarse)])
    sz = {20.0: np.ones_like(xy20), 10.0: np.full_like(xy10, 2), 5.0: np.full_like(xy5, 4)}
    p = parent_indices(xy20, sz[20.0], xy10, sz[10.0])
    f10 = np.stack([fine[p == r].mean(0) for r in range(len(xy10))])
    p = parent_indices(xy10, sz[10.0], xy5, sz[5.0])
    f5 = np.stack([f10[p == r].mean(0) for r in range(len(xy5))])
    keep = np.ones(len(xy10), bool)
    if drop and rng is not None:
        keep = rng.random(len(xy10)) >= drop
        keep[rng.integers(len(xy10))] = True
    groups = {5.0: (f5, xy5), 10.0: (f10[keep], xy10[keep]), 20.0: (fine, xy20)}
    return FakeStore({m: {"features": f.astype(np.float32), "coords": xy, "size": sz[m][: len(xy)]}
                      for m, (f, xy) in groups.items()})


def _multiscale(rng, X, t, nines, others, positive, sid):
    n_coarse = int(rng.integers(1, 3))
    idx = rng.choice(others, 16 * n_coarse)
    if positive:  # a small '9' region: 2-4 of the four 20x children of one 10x tile
        c, i2, j2 = int(rng.integers(n_coarse)), int(rng.integers(2)), int(rng.integers(2))
        block = [16 * c + (2 * j2 + dj) * 4 + 2 * i2 + di for dj in (0, 1) for di in (0, 1)]
        where = rng.choice(block, int(rng.integers(2, 5)), replace=False)
        idx[where] = rng.choice(nines, len(where))
    bag = multiscale_bag(nested_groups(X[idx], n_coarse, rng, drop=0.15), MAGS)
    return {sid: bag}, {sid: t[idx] == 9}, [dict(slide_id=sid, patient_id=f"p-{sid}")]


def multiscale_digit_bags(n_train=200, n_val=50, n_test=100, seed=0):
    """Digit bags on three nested scales: 1-2 5x tiles, each over 16 20x digits (see nested_groups);
    positive when a '9' is among the 20x digits (1-3 of them). Test bags use held-out images."""
    return _generate(_multiscale, n_train, n_val, n_test, seed)


def _case(rng, X, t, nines, others, positive, case):
    slides = [(stain, k, rng.choice(others, max(2, int(round(rng.normal(5, 1))))))
              for stain in ("HE", "IHC") for k in range(int(rng.integers(1, 4)))]
    if positive:
        for _ in range(int(rng.integers(1, 4))):
            _, _, idx = slides[int(rng.integers(len(slides)))]
            idx[int(rng.integers(len(idx)))] = rng.choice(nines)
    stains, ids, inst, rows = {}, {}, {}, []
    for stain, k, idx in slides:
        x = X[idx] if stain == "HE" else 0.6 * X[idx] + 0.2
        sid = f"{case}_{stain}{k + 1}"
        stains.setdefault(stain, []).append(x)
        ids.setdefault(stain, []).append(sid)
        inst[sid] = t[idx] == 9
        rows.append(dict(slide_id=sid, patient_id=case))
    return {case: CaseBag(stains, ids, case)}, inst, rows


def case_digit_bags(n_train=200, n_val=50, n_test=100, seed=0):
    """Cases of 2 "stains" x 1-3 slices, each slice a bag of ~5 digits; stain "IHC" shows the digits
    in another "colour scheme" (paler: 0.6 x + 0.2). A case is positive when a '9' is anywhere (1-3
    of them, in any slices). One splits row per slide."""
    return _generate(_case, n_train, n_val, n_test, seed)
