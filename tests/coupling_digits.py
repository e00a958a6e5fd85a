"""The coupled-training digit benchmark (ICMIL on digit bags), shared by tests/test_coupling.py and
scripts/bench/bench_coupling_digits.py.

Instances are raw 8x8 digit images (scikit-learn's bundled digits, tests/digit_bags.py); the patch
embedder is a small CNN from random init; the bag model is ABMIL. Round 0 trains ABMIL on the random
CNN's features (today's pipeline: a frozen embedder); each further round runs the embedder step of
slidesnake.coupling on the training bags only and re-embeds every bag.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from slidesnake.coupling import CouplingSettings, InstanceHead, finetune_embedder, instance_probabilities, pseudo_labels
from slidesnake.training import train_fold
from digit_bags import CLASSES, digit_bags

MODEL_KWARGS = {"hidden": 32}
TRAINING = {"lr": 1e-3, "epochs": 20, "patience": 5, "min_epochs": 5}
SETTINGS = dict(selection="fraction", top_fraction=0.2, bottom_fraction=0.4, tiles_per_slide=16, steps=150,
                batch_size=32, lr=3e-3, weight_decay=0.0, ema=0.9, consistency=1.0, colour_jitter=0.05,
                flip_rotate=False)  # a rotated or mirrored digit is another digit (a 9 turned is a 6)


def small_cnn(seed: int, dim: int = 4) -> nn.Module:
    """A two-layer CNN, 8x8x1 -> ``dim``, from random init. 4-d: a weak frozen embedder (at 32-d its
    random features already give ABMIL an instance AUC of ~0.97, leaving coupling nothing to show)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(64, dim))


@torch.no_grad()
def embed(embedder: nn.Module, images: dict) -> dict:
    embedder.eval()
    return {k: embedder(torch.from_numpy(v)).numpy() for k, v in images.items()}


def run(seed: int = 0, rounds: int = 2, n_train: int = 100, n_val: int = 30, n_test: int = 60,
        settings: dict | None = None) -> list[dict]:
    """Bag AUC (test bags) and instance AUC (each test tile alone, p(nine) vs "is a 9") per round."""
    bags, inst, splits = digit_bags(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    images = {k: v.reshape(-1, 1, 8, 8).astype(np.float32) for k, v in bags.items()}
    cfg = CouplingSettings(**{**SETTINGS, **(settings or {}), "seed": seed})
    embedder = small_cnn(seed)
    train_ids = splits.loc[splits["split"] == "train", "slide_id"].tolist()
    labels = dict(zip(splits["slide_id"], splits["label"].map(CLASSES.index)))
    test = splits.loc[splits["split"] == "test", "slide_id"].tolist()
    out = []
    for r in range(rounds + 1):
        feats = embed(embedder, images)
        res = train_fold(feats, splits, CLASSES, "abmil", MODEL_KWARGS, seed=seed, device="cpu", **TRAINING)
        pred = res.predictions[res.predictions["split"] == "test"]
        head = InstanceHead(res.model, res.feature_mean, res.feature_std)
        score = np.concatenate([instance_probabilities(head, feats[s])[:, 1] for s in test])
        truth = np.concatenate([inst[s] for s in test])
        out.append({"seed": seed, "round": r, "bag_auc": roc_auc_score(pred["label"] == "nine", pred["prob_nine"]),
                    "instance_auc": roc_auc_score(truth, score)})
        if r == rounds:
            break
        # embedder step: pseudo labels on the TRAINING bags only, then teacher-student fine-tuning
        table = pseudo_labels(head, {s: feats[s] for s in train_ids}, labels, cfg, seed=seed + r)
        x = torch.from_numpy(np.concatenate([images[s][g["row"].to_numpy()] for s, g in table.groupby("slide_id")]))
        y = np.concatenate([g["label"].to_numpy() for _, g in table.groupby("slide_id")])
        embedder = finetune_embedder(embedder, head, x, y, cfg, log_every=10**9).embedder
    return out
