"""Coupled embedder and bag-classifier training (config ``training.coupling``): ICMIL.

Wang et al., "Iteratively Coupled Multiple Instance Learning from Instance to Bag Classifier for
Whole Slide Image Classification", MICCAI 2023 (reference code: github.com/Dootmaan/ICMIL,
``step1_train_classifier_abmil.py`` and ``step2_teacher_student_abmil_distillation.py``). MIL is
treated as an EM-like loop: with the patch embedder fixed the bag classifier is trained (the usual
``train`` rule), then with the bag classifier fixed the embedder is fine-tuned on the instance
labels that classifier implies, and every slide is embedded again. Per fold and round r >= 1:

1. pseudo labels (:func:`select_confident`): the round-(r-1) bag model's own classifier scores each
   tile of the fold's **training** slides alone, as a bag of one (``MILModel.single_instance_logits``,
   on the round-(r-1) features of the tile). Tiles of slides of the first class (``classes[0]``, the
   negative class) are labelled negative (the MIL assumption); in slides of another class only
   confident tiles are kept -- top / bottom fractions per slide or probability thresholds --
   labelled with the slide's class or negative;
2. embedder step (:func:`finetune_embedder`): a copy of the embedder (the student) learns those
   labels on augmented views (flips, 90-degree rotations, mild colour jitter) through the bag
   classifier's frozen instance head, plus a consistency term towards the teacher's prediction on the
   clean view; the teacher is the exponential moving average (EMA) of the student and is the
   embedder kept. Bounded by ``steps`` x ``batch_size`` and ``tiles_per_slide``;
3. the workflow (``workflow/rules/coupling.smk``) then re-embeds every slide of the fold with the
   teacher's weights through the normal ``extract_features`` script and trains round r's bag model.

Where this differs from the ICMIL code: ICMIL's step 2 distils the teacher's soft predictions
(KL divergence) on all sampled patches and keeps the teacher fixed; here confident tiles carry hard
labels (the selection the paper describes in its confidence-based variant), the KL term to an EMA
teacher is the consistency part, and the bag head stays frozen (ICMIL also fine-tunes a copy of its
dimension-reduction and classifier layers, which then are thrown away).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from slidesnake.io import atomic_path, sha256_file

_log = logging.getLogger("slidesnake.coupling")
SELECTIONS = ("fraction", "threshold")


@dataclass
class CouplingSettings:
    """``training.coupling`` of the config (documented in config/config.yaml)."""

    rounds: int = 0
    selection: str = "fraction"
    top_fraction: float = 0.2
    bottom_fraction: float = 0.2
    positive_threshold: float = 0.9
    negative_threshold: float = 0.1
    tiles_per_slide: int = 64
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    ema: float = 0.99
    consistency: float = 1.0
    colour_jitter: float = 0.05
    flip_rotate: bool = True
    seed: int = 0
    device: str = "auto"

    @classmethod
    def from_config(cls, section: Mapping | None) -> "CouplingSettings":
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"training.coupling: unknown key(s) {unknown}; known: {sorted(known)}")
        s = cls(**section)
        if s.selection not in SELECTIONS:
            raise ValueError(f"training.coupling.selection must be one of {SELECTIONS}; got {s.selection!r}")
        return s

    def step_params(self) -> dict:
        """What a round's jobs depend on: every setting but ``rounds`` (adding a round must not rerun
        the finished ones)."""
        d = asdict(self)
        d.pop("rounds")
        return d


def check_model(model_name: str) -> None:
    """One line refusing a model without an instance-level score (slidesnake.config.check_coupling_model)."""
    from slidesnake.config import check_coupling_model

    check_coupling_model(model_name)


# --------------------------------------------------------------------------------- instance head

class InstanceHead(nn.Module):
    """A trained bag model's instance classifier as a frozen module: standardise features as in
    training (the checkpoint's mean / std), then ``single_instance_logits`` -> ``(B, n_classes)``."""

    def __init__(self, model, feature_mean, feature_std):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.as_tensor(np.asarray(feature_mean), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.asarray(feature_std), dtype=torch.float32))

    def train(self, mode: bool = True):  # the head stays in eval mode (no dropout): it is fixed
        return super().train(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.single_instance_logits((features.float() - self.mean) / self.std)


@torch.no_grad()
def instance_probabilities(head: InstanceHead, features: np.ndarray, batch: int = 4096) -> np.ndarray:
    """``(N, n_classes)`` probabilities of every tile scored alone."""
    dev = head.mean.device
    out = [torch.softmax(head(torch.from_numpy(np.asarray(features[i:i + batch], np.float32)).to(dev)), -1).cpu()
           for i in range(0, len(features), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, head.model.n_classes), np.float32)


# -------------------------------------------------------------------------------- pseudo labels

def select_confident(probs: np.ndarray, label: int, settings: CouplingSettings,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows and pseudo labels of the confident tiles of one training slide of class ``label``.

    ``probs``: ``(N, n_classes)`` of the tiles scored alone. Class 0 (the negative class): every
    tile is negative. Another class c: ``fraction`` keeps the ``top_fraction`` of tiles with the
    highest p(c) as c and the ``bottom_fraction`` with the lowest as 0 (ceil, at least one each,
    never overlapping); ``threshold`` keeps p(c) >= ``positive_threshold`` as c and
    p(c) <= ``negative_threshold`` as 0. At most ``tiles_per_slide`` are kept (a seeded random
    subset, positives and negatives in proportion).
    """
    n = len(probs)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if label == 0:
        rows, labels = np.arange(n), np.zeros(n, np.int64)
    else:
        p = probs[:, label]
        order = np.argsort(-p, kind="stable")
        if settings.selection == "fraction":
            k_top = min(n, max(1, math.ceil(settings.top_fraction * n))) if settings.top_fraction > 0 else 0
            k_bot = min(n - k_top, max(1, math.ceil(settings.bottom_fraction * n))) if settings.bottom_fraction > 0 else 0
            pos, neg = order[:k_top], order[n - k_bot:] if k_bot else order[:0]
        else:
            pos = np.flatnonzero(p >= settings.positive_threshold)
            neg = np.flatnonzero(p <= settings.negative_threshold)
        rows = np.concatenate([pos, neg]).astype(np.int64)
        labels = np.concatenate([np.full(len(pos), label), np.zeros(len(neg))]).astype(np.int64)
    cap = int(settings.tiles_per_slide)
    if cap > 0 and len(rows) > cap:
        keep = np.sort(rng.choice(len(rows), cap, replace=False))
        rows, labels = rows[keep], labels[keep]
    return rows, labels


def pseudo_labels(head: InstanceHead, features: Mapping[str, np.ndarray], slide_labels: Mapping[str, int],
                  settings: CouplingSettings, seed: int = 0) -> pd.DataFrame:
    """Confident tiles of every slide in ``features`` (the caller passes training slides only).

    Returns ``slide_id, row, label, score`` (score: the tile's probability of its slide's class).
    """
    rng = np.random.default_rng(seed)
    frames = []
    for sid in sorted(features):
        probs = instance_probabilities(head, features[sid])
        lab = int(slide_labels[sid])
        rows, labels = select_confident(probs, lab, settings, rng)
        frames.append(pd.DataFrame({"slide_id": sid, "row": rows, "label": labels,
                                    "score": probs[rows, lab] if len(rows) else np.zeros(0)}))
    if not frames:
        return pd.DataFrame(columns=["slide_id", "row", "label", "score"])
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------- augmentation

def augment(x: torch.Tensor, generator: torch.Generator, colour_jitter: float = 0.05,
            flip_rotate: bool = True) -> torch.Tensor:
    """Random views of a float batch ``(B, C, H, W)`` in [0, 1]: horizontal / vertical flips and
    rotations by multiples of 90 degrees (square tiles; ``flip_rotate``: tissue has no orientation,
    digits do), and mild colour jitter -- brightness and contrast (and saturation with 3 channels)
    each scaled by ``1 + U(-j, j)``."""
    b = x.shape[0]
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    out = x
    if flip_rotate:
        out = torch.where(rand(b, 1, 1, 1) < 0.5, out.flip(-1), out)
        out = torch.where(rand(b, 1, 1, 1) < 0.5, out.flip(-2), out)
    if flip_rotate and out.shape[-1] == out.shape[-2]:
        k = torch.randint(0, 4, (b,), generator=generator)
        out = torch.stack([torch.rot90(out[i], int(k[i]), dims=(-2, -1)) for i in range(b)])
    j = float(colour_jitter)
    if j > 0:
        bright = 1 + (2 * rand(b, 1, 1, 1) - 1) * j
        contrast = 1 + (2 * rand(b, 1, 1, 1) - 1) * j
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast + mean * bright
        if out.shape[1] == 3:
            sat = 1 + (2 * rand(b, 1, 1, 1) - 1) * j
            grey = out.mean(dim=1, keepdim=True)
            out = (out - grey) * sat + grey
    return out.clamp(0, 1)


# ------------------------------------------------------------------------------- embedder step

@dataclass
class EmbedderStepResult:
    embedder: nn.Module          # the EMA teacher: the weights kept
    history: pd.DataFrame        # per logged step: loss, ce, consistency, student / teacher accuracy
    n_tiles: int


def _freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm layers keep their running statistics (small, label-skewed batches would spoil them)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def finetune_embedder(embedder: nn.Module, head: nn.Module, images: torch.Tensor, labels: np.ndarray,
                      settings: CouplingSettings, *, normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      device: str | torch.device = "cpu", log: logging.Logger | None = None,
                      log_every: int = 50) -> EmbedderStepResult:
    """Teacher-student fine-tuning of a copy of ``embedder`` with ``head`` frozen on top.

    ``images``: ``(N, C, H, W)`` uint8 or float in [0, 1] (kept on the host; batches move to the
    device); ``labels``: ``(N,)`` pseudo labels. ``normalise`` maps a float [0, 1] batch to the
    embedder's input (e.g. ImageNet mean / std). Each of ``settings.steps`` steps draws
    ``batch_size`` tiles (seeded), the teacher (EMA of the student, starting as the embedder) scores
    the clean view, the student an augmented view; loss = cross-entropy to the pseudo labels +
    ``consistency`` x KL(teacher || student). AdamW on the student; gradients clipped at 5 (as ICMIL).
    ``embedder`` itself is not changed.
    """
    log = log or _log
    dev = torch.device(device)
    normalise = normalise or (lambda t: t)
    student = copy.deepcopy(embedder).to(dev).requires_grad_(True)
    teacher = copy.deepcopy(embedder).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    head = head.to(dev).eval()
    for p in head.parameters():
        p.requires_grad_(False)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = len(y_all)
    if n == 0:
        raise ValueError("no confident tile to fine-tune the embedder on (check training.coupling's "
                         "selection settings, and that the fold has training slides with tiles)")
    gen = torch.Generator().manual_seed(int(settings.seed))
    torch.manual_seed(int(settings.seed))
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr,
                            weight_decay=settings.weight_decay)
    rows = []
    acc = {"loss": 0.0, "ce": 0.0, "consistency": 0.0, "student_acc": 0.0, "teacher_acc": 0.0, "k": 0}
    # class-balanced batches: each pseudo label equally often (negatives far outnumber the confident
    # positives; unbalanced, the student learns to call everything negative and its features collapse)
    groups = [torch.nonzero(y_all == c).flatten() for c in torch.unique(y_all)]
    bsz = min(int(settings.batch_size), n)
    for step in range(1, int(settings.steps) + 1):
        pick = torch.randint(0, len(groups), (bsz,), generator=gen)
        idx = torch.stack([groups[int(c)][torch.randint(0, len(groups[int(c)]), (1,), generator=gen)[0]]
                           for c in pick])
        x = images[idx]
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(dev)
        y = y_all[idx].to(dev)
        with torch.no_grad():
            t_logits = head(teacher(normalise(x)))
        student.train()
        _freeze_batchnorm(student)
        s_logits = head(student(normalise(augment(x, gen, settings.colour_jitter, settings.flip_rotate))))
        ce = F.cross_entropy(s_logits, y)
        cons = F.kl_div(F.log_softmax(s_logits, -1), F.softmax(t_logits, -1), reduction="batchmean")
        loss = ce + settings.consistency * cons
        if not torch.isfinite(loss):
            raise FloatingPointError(f"embedder step {step}: non-finite loss; lower training.coupling.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        with torch.no_grad():  # the teacher follows the student
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(settings.ema).add_(ps.detach(), alpha=1 - settings.ema)
            for bt, bs in zip(teacher.buffers(), student.buffers()):
                bt.copy_(bs)
        acc["loss"] += float(loss.detach())
        acc["ce"] += float(ce.detach())
        acc["consistency"] += float(cons.detach())
        acc["student_acc"] += float((s_logits.argmax(-1) == y).float().mean())
        acc["teacher_acc"] += float((t_logits.argmax(-1) == y).float().mean())
        acc["k"] += 1
        if step % log_every == 0 or step == int(settings.steps):
            k = acc.pop("k")
            row = {"step": step, **{name: v / k for name, v in acc.items()}}
            rows.append(row)
            log.info("embedder step %d/%d: loss %.4f (ce %.4f, consistency %.4f), accuracy on pseudo labels "
                     "student %.3f teacher %.3f", step, settings.steps, row["loss"], row["ce"], row["consistency"],
                     row["student_acc"], row["teacher_acc"])
            acc = {name: 0.0 for name in row if name != "step"} | {"k": 0}
    teacher.eval()
    return EmbedderStepResult(teacher, pd.DataFrame(rows), n)


# ------------------------------------------------------------------------ workflow: one fold/round

def _tile_pixels(store, slide_path: str, rows: np.ndarray, magnification: float, input_size: int,
                 slide_id: str) -> torch.Tensor:
    """uint8 ``(n, 3, S, S)`` of the store's tiles ``rows`` at ``magnification``, read from the slide
    at their native size and resized to the backbone's input size ``S``."""
    from PIL import Image

    from slidesnake.geometry import mag_label as mag_key
    from slidesnake.tiling import TileReader

    attrs = store.attrs
    ga = store.root[mag_key(magnification)].attrs
    if "dz_tile_size" not in ga or "dz_level" not in ga:
        raise ValueError(f"{store.path}: group {mag_key(magnification)} lacks dz_tile_size / dz_level; "
                         "extract its features again")
    reader = TileReader(slide_path, int(attrs["tile_size"]), int(attrs.get("overlap", 0)),
                        bool(attrs.get("limit_bounds", False)), slide_id=slide_id)
    grid = store.grid(magnification)
    out = np.empty((len(rows), input_size, input_size, 3), np.uint8)
    for k, r in enumerate(rows):
        tile = reader.read_native(int(ga["dz_tile_size"]), int(ga["dz_level"]), int(grid[r, 0]), int(grid[r, 1]))
        if tile.size != (input_size, input_size):
            tile = tile.resize((input_size, input_size), Image.BILINEAR)
        out[k] = np.asarray(tile.convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def embedder_step(
    splits_fold: pd.DataFrame,
    stores: Sequence[str | os.PathLike],
    slide_paths: Mapping[str, str],
    bag_checkpoint: str | os.PathLike,
    classes: Sequence[str],
    *,
    backbone: str,
    weights: str,
    magnification: float | None,
    settings: CouplingSettings,
    out_weights: str | os.PathLike,
    out_info: str | os.PathLike,
    out_labels: str | os.PathLike,
    fold: int,
    round: int,
    log: logging.Logger | None = None,
) -> dict:
    """One fold's embedder step of one round: pseudo labels on the fold's training slides from the
    previous round's bag model and features, teacher-student fine-tuning of the previous round's
    embedder (``backbone`` with ``weights``), and its weights (a state dict ``.pth``) with sha256.

    Only rows of ``splits_fold`` with ``split == "train"`` are read: stores and slide files of
    validation and test slides are never opened. ``out_info`` (JSON) records the provenance: fold,
    round, base weights and their sha256, the bag model's sha256, the weights' sha256, tiles per
    pseudo label, the settings and the loss history.
    """
    from slidesnake.backbones import create_backbone
    from slidesnake.bags import excluded_reason, stores_by_slide
    from slidesnake.store import open_store
    from slidesnake.training import load_checkpoint

    log = log or _log
    classes = [str(c) for c in classes]
    df = splits_fold.astype({"slide_id": str, "label": str, "split": str})
    train = df[df["split"] == "train"]
    if train.empty:
        raise ValueError(f"fold {fold}: no training slide; the embedder step reads training slides only")
    dev = torch.device("cuda" if settings.device == "auto" and torch.cuda.is_available() else
                       "cpu" if settings.device == "auto" else settings.device)
    model, ckpt = load_checkpoint(bag_checkpoint, device=str(dev))
    check_model(ckpt["model_name"])
    head = InstanceHead(model, ckpt["feature_mean"].cpu().numpy(), ckpt["feature_std"].cpu().numpy()).to(dev)
    by_id = stores_by_slide(stores)
    mag = None if magnification is None else float(magnification)
    feats, labels, opened = {}, {}, {}
    for sid, lab in zip(train["slide_id"], train["label"]):
        store = open_store(by_id[sid])
        if reason := excluded_reason(store):
            log.warning("fold %d round %d: training slide %s %s; left out of the embedder step", fold, round, sid, reason)
            continue
        f = store.features(mag)
        if len(f) == 0:
            continue
        feats[sid], labels[sid], opened[sid] = f, classes.index(lab), store
    table = pseudo_labels(head, feats, labels, settings, seed=settings.seed + 7919 * fold + round)
    counts = {classes[c]: int((table["label"] == c).sum()) for c in range(len(classes))}
    log.info("fold %d round %d: %d confident tiles from %d training slides (%s)", fold, round, len(table),
             len(feats), ", ".join(f"{k}: {v}" for k, v in counts.items()))
    bb = create_backbone(backbone, weights=weights)
    mean = torch.tensor(bb.mean, dtype=torch.float32).view(1, 3, 1, 1).to(dev)
    std = torch.tensor(bb.std, dtype=torch.float32).view(1, 3, 1, 1).to(dev)
    images, ys = [], []
    for sid, part in table.groupby("slide_id", sort=True):
        store = opened[sid]
        m = mag if mag is not None else store.magnifications[0]
        rows = part["row"].to_numpy()
        images.append(_tile_pixels(store, slide_paths[sid], rows, m, bb.input_size, sid))
        ys.append(part["label"].to_numpy())
    tiles = torch.cat(images) if images else torch.zeros((0, 3, bb.input_size, bb.input_size), dtype=torch.uint8)
    res = finetune_embedder(bb.model, head, tiles, np.concatenate(ys) if ys else np.zeros(0, np.int64), settings,
                            normalise=lambda x: (x - mean) / std, device=dev, log=log)
    # saved through memory: torch.save names the archive after the file, and the temporary name would
    # make every save's bytes (and sha256) differ
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in res.embedder.state_dict().items()}, buf)
    with atomic_path(out_weights) as tmp:
        tmp.write_bytes(buf.getvalue())
    sha = sha256_file(out_weights)
    info = {
        "fold": int(fold), "round": int(round), "backbone": backbone,
        "initial_weights": bb.weights, "initial_weights_sha256": bb.weights_sha256,
        "bag_model": str(bag_checkpoint), "bag_model_sha256": sha256_file(bag_checkpoint),
        "weights": str(out_weights), "weights_sha256": sha,
        "training_slides": sorted(feats), "tiles": int(res.n_tiles), "tiles_per_label": counts,
        "settings": settings.step_params(), "device": str(dev),
        "history": res.history.to_dict(orient="records"),
    }
    with atomic_path(out_info) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n")
    from slidesnake.io import write_table

    write_table(table, out_labels)
    log.info("fold %d round %d: embedder weights %s (sha256 %s)", fold, round, out_weights, sha[:12])
    return info
