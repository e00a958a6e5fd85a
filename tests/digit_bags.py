"""The digit-bags MIL benchmark shared by the training and model-zoo tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits

CLASSES = ["other", "nine"]


def digit_bags(n_train=200, n_val=50, n_test=100, seed=0):
    """MNIST-bags (Ilse et al. 2018) from scikit-learn's 8x8 digits.

    Instances are digit images as 64-d vectors in [0, 1]; a bag is positive when it holds at least
    one '9' (here 1-3 of them, half of the bags positive); bag sizes ~ Normal(10, 2) clipped to
    >= 2. Train/val bags draw from one half of the images, test bags from the other half.
    """
    X, t = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    pools = {"train": perm[: len(X) // 2], "test": perm[len(X) // 2:]}
    bags, inst, rows = {}, {}, []
    for split, n_bags in (("train", n_train), ("val", n_val), ("test", n_test)):
        pool = pools["test" if split == "test" else "train"]
        nines, others = pool[t[pool] == 9], pool[t[pool] != 9]
        for b in range(n_bags):
            n = max(2, int(round(rng.normal(10, 2))))
            idx = rng.choice(others, n)
            positive = b % 2 == 0
            if positive:
                where = rng.choice(n, min(n, int(rng.integers(1, 4))), replace=False)
                idx[where] = rng.choice(nines, len(where))
            sid = f"{split}{b:03d}"
            bags[sid], inst[sid] = X[idx], t[idx] == 9
            rows.append(dict(fold=0, slide_id=sid, patient_id=f"p-{sid}", label=CLASSES[int(positive)],
                             split=split))
    return bags, inst, pd.DataFrame(rows)
