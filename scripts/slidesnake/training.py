"""Per-fold MIL training: one bag per step, weighted cross-entropy, early stopping on val loss.

The entry points used by ``scripts/train.py`` and the heatmap stage:

- :func:`load_bags` reads the bags of the model's ``bag_type`` from the Zarr feature stores: one
  magnification of each slide (flat), several magnifications with parent links (multiscale) or
  every slide of a patient grouped by stain (hierarchical; see :mod:`slidesnake.bags`);
- :func:`train_fold` trains one fold and predicts every bag (slide, or patient for case bags) of it;
- :func:`save_checkpoint` / :func:`load_checkpoint` (``torch.load(weights_only=True)``);
- :func:`predict_bag` / :func:`predict_output` apply a checkpoint (standardisation included) to one bag.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score

from slidesnake.bagkinds import bag_kind
from slidesnake.bags import (NonFiniteLossError, check_bag_type, empty_reason, feature_arrays,
                             feature_dims, map_features, stores_by_slide, to_device)
from slidesnake.evaluate import auc_score
from slidesnake.io import atomic_path
from slidesnake.devices import resolve_device
from slidesnake.models import MILModel, MILOutput, create_model, get_model_class
from slidesnake.splits import check_splits

_log = logging.getLogger("slidesnake.training")
CHECKPOINT_VERSION = 1
STD_EPS = 1e-6


@dataclass
class TrainResult:
    model: MILModel
    history: pd.DataFrame
    predictions: pd.DataFrame
    best_epoch: int
    model_name: str = ""
    model_kwargs: dict = field(default_factory=dict)
    in_dim: int = 0
    classes: list = field(default_factory=list)
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None
    fold: int | None = None
    class_weights: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # slides with empty bags


# ----------------------------------------------------------------------------------------- bags

def load_bags(stores: Sequence[str | os.PathLike], magnification: float | None,
              slide_ids: Sequence[str] | None = None, log: logging.Logger | None = None, *,
              bag_type: str = "flat", magnifications: Sequence[float] | None = None,
              samples: pd.DataFrame | None = None, on_bad_slide: str = "fail") -> dict:
    """The bags of ``bag_type`` read once from the ``<slide_id>.zarr`` stores.

    ``flat``: slide_id -> features ``(N, D) float32`` of ``magnification``. ``multiscale``:
    slide_id -> :class:`~slidesnake.bags.MultiscaleBag` at ``magnifications``. ``hierarchical``:
    patient_id -> :class:`~slidesnake.bags.CaseBag` of the patient's slides (``samples``: the sample
    sheet, for patient and stain) at ``magnification``. With ``slide_ids`` only those slides are
    read, and each must have a store. A store marked excluded (config ``on_bad_slide: skip``)
    gives an :class:`~slidesnake.bags.ExcludedBag` (logged; training skips it with the reason);
    NaN / Inf features raise :class:`~slidesnake.bags.NonFiniteError` naming the slide. Every store is
    checked against its integrity manifest first: a damaged one raises
    :class:`~slidesnake.integrity.StoreIntegrityError`, or with ``on_bad_slide="skip"`` (config
    ``on_bad_slide``) is an ``ExcludedBag`` giving that reason.
    """
    from slidesnake.store import check_same_encoder

    log = log or _log
    by_id = stores_by_slide(stores)
    wanted = list(by_id) if slide_ids is None else [str(s) for s in slide_ids]
    missing = [s for s in wanted if s not in by_id]
    if missing:
        raise KeyError(f"no feature store for slide(s) {missing[:10]} ({len(missing)} in all)")
    check_same_encoder(by_id[s] for s in wanted)  # one encoder's features per model
    return bag_kind(bag_type).load(by_id, wanted, magnification=magnification, magnifications=magnifications,
                                   samples=samples, log=log, on_bad_slide=on_bad_slide)


def _feature_stats(arrays: Sequence[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over all rows of ``arrays`` (float64 accumulation)."""
    n = 0
    s = np.zeros(dim, dtype=np.float64)
    ss = np.zeros(dim, dtype=np.float64)
    for a in arrays:
        a64 = a.astype(np.float64, copy=False)
        n += len(a64)
        s += a64.sum(0)
        ss += np.square(a64).sum(0)
    mean = s / n
    var = np.maximum(ss / n - np.square(mean), 0.0)
    std = np.sqrt(var)
    std[std < STD_EPS] = 1.0  # constant dimensions: centre only
    return mean.astype(np.float32), std.astype(np.float32)


def _standardise(bag, mean: torch.Tensor, std: torch.Tensor, device: torch.device):
    """A bag of any type as float32 tensors on ``device``, standardised with ``mean`` / ``std``."""
    def one(a):
        return (torch.from_numpy(np.asarray(a, dtype=np.float32)) - mean) / std

    return to_device(map_features(bag, one), device)


# ------------------------------------------------------------------------------------ training

def _class_weights(spec, y_train: np.ndarray, classes: list[str], log: logging.Logger) -> np.ndarray:
    k = len(classes)
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return np.ones(k)
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"class_weights must be 'auto', 'none' or a list of {k} numbers; got {spec!r}")
        counts = np.bincount(y_train, minlength=k).astype(float)
        w = np.zeros(k)
        present = counts > 0
        if not present.all():
            log.warning("class(es) %s absent from the training split; weight 0",
                        [c for c, p in zip(classes, present) if not p])
        # inverse frequency, normalised so that the mean weight over training bags is 1
        w[present] = len(y_train) / (present.sum() * counts[present])
        return w
    w = np.asarray(list(spec), dtype=float)
    if w.shape != (k,) or (w < 0).any():
        raise ValueError(f"class_weights needs {k} non-negative numbers (one per class {classes}); got {spec!r}")
    return w


def _make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'adam'; got {name!r}")


@torch.no_grad()
def _predict(model: MILModel, bags: list[torch.Tensor], y: np.ndarray | None = None,
             weights: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """Class probabilities of each bag and (with ``y``) the mean loss."""
    model.eval()
    dev = next(model.parameters()).device
    probs, losses = [], []
    for i, bag in enumerate(bags):
        out = model(bag)
        probs.append(torch.softmax(out.logits.float(), dim=-1).cpu().numpy())
        if y is not None:
            label = torch.tensor(int(y[i]), device=dev)
            losses.append(float(model.loss(out, label, weights)["total"]))
    probs_arr = np.stack(probs) if probs else np.zeros((0, model.n_classes))
    return probs_arr, float(np.mean(losses)) if losses else float("nan")


def _tensorboard_writer(logdir, log: logging.Logger):
    """A TensorBoard ``SummaryWriter`` on ``logdir`` (None: no TensorBoard)."""
    if not logdir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's module imports the tensorboard package
        raise ImportError(f"training.tensorboard is on but TensorBoard is not installed ({err}); "
                          "pip install tensorboard, or set training.tensorboard: false") from None
    log.info("TensorBoard event files in %s (tensorboard --logdir %s)", logdir, logdir)
    return SummaryWriter(log_dir=str(logdir))


def train_fold(
    bags: Mapping[str, object],
    splits_fold: pd.DataFrame,
    classes: Sequence,
    model_name: str = "abmil",
    model_kwargs: Mapping | None = None,
    *,
    lr: float = 2e-4,
    weight_decay: float = 1e-4,
    optimizer: str = "adamw",
    epochs: int = 50,
    patience: int = 10,
    min_epochs: int = 5,
    class_weights="auto",
    seed: int = 0,
    device: str = "auto",
    lr_factor: float = 0.5,
    lr_patience: int = 5,
    log: logging.Logger | None = None,
    tensorboard: str | os.PathLike | None = None,
) -> TrainResult:
    """Train one fold; return the best model (lowest val loss), history and predictions.

    ``splits_fold`` is one fold's rows of splits.csv. ``bags`` holds bags of the model's
    ``bag_type`` (see :func:`load_bags`): flat and multiscale bags are keyed by slide_id; case bags
    (hierarchical models) by patient_id, and then the prediction unit is the patient (the fold's
    rows are reduced to one per patient, :func:`slidesnake.bags.case_rows`, whose ``slide_id`` is
    the patient id). Features are standardised with the per-dimension mean/std of all training
    tiles (every magnification / slide of the training bags). Empty bags (for multiscale: no tile
    at some magnification) are skipped (warning) and get no prediction row. Constructor arguments
    that a model reads off the bags (``MILModel.infer_kwargs``, e.g. the magnifications) are added
    to ``model_kwargs`` and saved with them. ``tensorboard``: a directory for TensorBoard event
    files (every history column per epoch, as it is trained; needs the ``tensorboard`` package).
    """
    log = log or _log
    data = prepare_fold(bags, splits_fold, classes, model_name, model_kwargs, class_weights=class_weights,
                        device=device, log=log)
    fold, dev, x, y = data.fold, data.device, data.x, data.y
    writer = _tensorboard_writer(tensorboard, log)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = create_model(model_name, data.in_dim, len(data.classes), **data.model_kwargs).to(dev)
        opt = _make_optimizer(optimizer, model.parameters(), lr, weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=lr_factor, patience=lr_patience)
        monitor = "val" if x["val"] else "train"
        stop = EarlyStopping(patience=patience, min_epochs=min_epochs)
        rows = []
        for epoch in range(1, int(epochs) + 1):
            t0 = time.perf_counter()
            cur_lr = opt.param_groups[0]["lr"]
            train = run_epoch(model, data, "train", optimizer=opt, order=rng.permutation(len(x["train"])),
                              epoch=epoch)
            val = run_epoch(model, data, "val", epoch=epoch)
            if x["val"]:
                val_auc = auc_score(y["val"], val.probs)
                val_bacc = float(balanced_accuracy_score(y["val"], val.probs.argmax(1)))
            else:
                val_auc = val_bacc = float("nan")
            score = val.loss if monitor == "val" else train.loss
            sched.step(score)
            improved = stop.update(score, epoch, model)
            secs = time.perf_counter() - t0
            rows.append(dict(epoch=epoch, train_loss=train.loss, val_loss=val.loss, val_auc=val_auc,
                             val_bacc=val_bacc, lr=cur_lr, seconds=secs, **train.terms))
            if writer is not None:
                for key, value in rows[-1].items():
                    if key != "epoch" and math.isfinite(value):
                        writer.add_scalar(f"fold_{fold}/{key}", value, epoch)
                writer.flush()
            log.info("fold %d epoch %3d/%d: train_loss %.4f val_loss %.4f val_auc %.4f val_bacc %.4f "
                     "lr %.2e %.1fs%s", fold, epoch, epochs, train.loss, val.loss, val_auc, val_bacc,
                     cur_lr, secs, " *" if improved else "")
            if stop.should_stop(epoch):
                log.info("fold %d: early stop at epoch %d (no %s loss improvement for %d epochs)",
                         fold, epoch, monitor, stop.since_best)
                break
        if stop.best_state is None:
            raise RuntimeError(f"fold {fold}: {monitor} loss never finite; training diverged (lower lr?)")
        model.load_state_dict(stop.best_state)
        model.eval()
        log.info("fold %d: best epoch %d (%s loss %.4f)", fold, stop.best_epoch, monitor, stop.best_loss)
        predictions = predict_fold(model, data)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if writer is not None:
            writer.close()
    return TrainResult(
        model=model, history=pd.DataFrame(rows), predictions=predictions, best_epoch=stop.best_epoch,
        model_name=model_name, model_kwargs=data.model_kwargs, in_dim=int(data.in_dim), classes=data.classes,
        feature_mean=data.mean, feature_std=data.std, fold=fold, class_weights=[float(w) for w in data.weights],
        skipped=data.skipped,
    )


@dataclass
class FoldData:
    """One fold ready to train (:func:`prepare_fold`): standardised bags on the device per split."""

    fold: int
    classes: list
    bag_type: str
    unit: str                     # "slide", or "patient" for case bags
    parts: dict                   # split -> its rows (one per prediction unit with a non-empty bag)
    x: dict                       # split -> standardised bags (tensors on the device)
    y: dict                       # split -> class indices
    in_dim: int
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray           # class weights of the loss
    weights_t: torch.Tensor
    device: torch.device
    model_kwargs: dict
    skipped: list                 # units with empty (or excluded) bags
    unit_order: dict              # unit -> row of the fold's table (the order of the predictions)


def prepare_fold(bags: Mapping[str, object], splits_fold: pd.DataFrame, classes: Sequence, model_name: str,
                 model_kwargs: Mapping | None = None, *, class_weights="auto", device: str = "auto",
                 log: logging.Logger | None = None) -> FoldData:
    """Check one fold's rows and bags, leave out empty bags (logged), standardise the bags with the
    training tiles' mean / std and move them to the device; the class weights; the constructor
    arguments the model reads off the bags. See :func:`train_fold`."""
    log = log or _log
    classes = [str(c) for c in classes]
    model_kwargs = dict(model_kwargs or {})
    df = splits_fold.copy()
    for c in ("slide_id", "patient_id", "label", "split"):
        if c in df.columns:
            df[c] = df[c].astype(str)
    check_splits(df, complete=False)
    folds = df["fold"].unique()
    if len(folds) != 1:
        raise ValueError(f"train_fold expects the rows of one fold; got folds {sorted(folds)}")
    fold = int(folds[0])
    model_cls = get_model_class(model_name)
    bag_type = model_cls.bag_type
    kind = bag_kind(bag_type)
    unit = kind.unit
    df = kind.prediction_rows(df)  # one row per prediction unit: slide, or patient (case bags)
    unit_order = {s: i for i, s in enumerate(df["slide_id"])}
    bad = sorted(set(df["label"]) - set(classes))
    if bad:
        raise ValueError(f"fold {fold}: label(s) {bad} not in classes {classes}")
    missing = [s for s in df["slide_id"] if s not in bags]
    if missing:
        raise KeyError(f"fold {fold}: no features for {unit}(s) {missing[:10]} ({len(missing)} in all)")
    for s in df["slide_id"]:
        check_bag_type(bags[s], bag_type, f"fold {fold}: {unit} {s}")

    reasons = {s: empty_reason(bags[s]) for s in df["slide_id"]}
    skipped = [s for s in df["slide_id"] if reasons[s]]
    for s in skipped:
        split = df.loc[df["slide_id"] == s, "split"].iloc[0]
        r = reasons[s]
        what = r if r.startswith("excluded") else f"has an {r}" if r.startswith("empty") else \
            f"has an unusable bag ({r})"
        log.warning("fold %d: %s %s %s; skipped (%s split, no prediction)", fold, unit, s, what, split)
    df = df[~df["slide_id"].isin(skipped)].reset_index(drop=True)
    dims = set().union(*(feature_dims(bags[s]) for s in df["slide_id"]))
    if len(dims) != 1:
        raise ValueError(f"fold {fold}: bags have different feature dimensions {sorted(dims)}")
    in_dim = dims.pop()
    parts = {s: df[df["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    if parts["train"].empty:
        raise ValueError(f"fold {fold}: no training slide with a non-empty bag")
    if parts["val"].empty:
        log.warning("fold %d: no validation slide with a non-empty bag; early stopping on training loss", fold)

    dev = resolve_device(device)
    if dev.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    mean, std = _feature_stats([np.asarray(a) for s in parts["train"]["slide_id"] for a in feature_arrays(bags[s])],
                               in_dim)
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)
    tensors = {s: _standardise(bags[s], mean_t, std_t, dev) for s in df["slide_id"]}
    # Bags are read once; constructor arguments a model reads off them (e.g. magnifications) are saved.
    for k, v in model_cls.infer_kwargs(bags[parts["train"]["slide_id"].iloc[0]]).items():
        if k in model_kwargs and _plain(model_kwargs[k]) != _plain(v):
            raise ValueError(f"fold {fold}: model_kwargs {k}={model_kwargs[k]!r} but the bags give {v!r}")
        model_kwargs.setdefault(k, v)
    cls_index = {c: i for i, c in enumerate(classes)}
    y = {name: part["label"].map(cls_index).to_numpy() for name, part in parts.items()}
    x = {name: [tensors[s] for s in part["slide_id"]] for name, part in parts.items()}
    weights = _class_weights(class_weights, y["train"], classes, log)
    weights_t = torch.tensor(weights, dtype=torch.float32, device=dev)
    log.info(
        "fold %d: %s on %s; %d train / %d val / %d test %s bags, dim %d; class weights %s",
        fold, model_name, dev, len(x["train"]), len(x["val"]), len(x["test"]), bag_type, in_dim,
        dict(zip(classes, np.round(weights, 4).tolist())),
    )
    return FoldData(fold=fold, classes=classes, bag_type=bag_type, unit=unit, parts=parts, x=x, y=y,
                    in_dim=int(in_dim), mean=mean, std=std, weights=weights, weights_t=weights_t, device=dev,
                    model_kwargs=model_kwargs, skipped=skipped, unit_order=unit_order)


@dataclass
class EpochResult:
    loss: float                          # mean loss over the split's bags (nan without bags / labels)
    probs: np.ndarray | None = None      # (n_bags, n_classes), evaluation only
    terms: dict = field(default_factory=dict)  # train: mean of every named loss term but the total


def run_epoch(model: MILModel, data: FoldData, split: str, *, optimizer: torch.optim.Optimizer | None = None,
              order: np.ndarray | None = None, epoch: int = 0, labels: bool = True) -> EpochResult:
    """One pass over a split's bags: the one loop for train, val and test (torchmil's
    ``_shared_loop``). With ``optimizer`` (the train split, in ``order``): one step per bag, a
    non-finite loss raises :class:`NonFiniteLossError` naming the bag. Without: evaluation, class
    probabilities and (``labels``) the mean loss; a non-finite validation loss raises too."""
    bags, y = data.x[split], data.y[split]
    if optimizer is None:
        probs, loss = _predict(model, bags, y if labels else None, data.weights_t)
        if split == "val" and labels and bags and not math.isfinite(loss):
            raise NonFiniteLossError(f"fold {data.fold}, epoch {epoch}: non-finite validation loss ({loss}) "
                                     f"over {len(bags)} val {data.unit}(s); lower training.lr")
        return EpochResult(loss=loss, probs=probs)
    model.train()
    total = 0.0
    sums: dict[str, torch.Tensor] = {}  # the other named loss terms, summed on the device
    for i in (range(len(bags)) if order is None else order):
        out = model(bags[i])
        label = torch.tensor(int(y[i]), device=data.device)
        terms = model.loss(out, label, data.weights_t)
        loss = terms["total"]
        value = float(loss.detach())  # the step's one host sync
        if not math.isfinite(value):  # one bag per step: it names the culprit
            raise NonFiniteLossError(
                f"fold {data.fold}, epoch {epoch}: non-finite training loss ({value}) on "
                f"{data.unit} {data.parts[split]['slide_id'].iloc[i]!r}; lower training.lr, or check that "
                f"{data.unit}'s features")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value
        for name, term in terms.items():
            if name != "total":
                t = term.detach().double()  # float64, as the total's Python float sum
                sums[name] = sums[name] + t if name in sums else t
    return EpochResult(loss=total / len(bags), terms={f"train_{n}": float(v) / len(bags) for n, v in sums.items()})


class EarlyStopping:
    """The best epoch so far (lowest monitored loss) and its weights; stop after ``patience`` epochs
    without improvement, never before ``min_epochs``."""

    def __init__(self, patience: int, min_epochs: int):
        self.patience, self.min_epochs = patience, min_epochs
        self.best_loss, self.best_epoch, self.best_state, self.since_best = math.inf, 0, None, 0

    def update(self, score: float, epoch: int, model: torch.nn.Module) -> bool:
        """Record an epoch's monitored loss; True when it improved (its weights are kept)."""
        improved = math.isfinite(score) and score < self.best_loss
        if improved:
            self.best_loss, self.best_epoch, self.since_best = score, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.since_best += 1
        return improved

    def should_stop(self, epoch: int) -> bool:
        return epoch >= self.min_epochs and self.since_best >= self.patience


def predict_fold(model: MILModel, data: FoldData) -> pd.DataFrame:
    """Predictions of every split's bags, in the fold table's order: fold, slide_id, patient_id,
    label, split, ``prob_<class>`` and ``pred``."""
    preds = []
    for name in ("train", "val", "test"):
        part = data.parts[name]
        if part.empty:
            continue
        probs = run_epoch(model, data, name, labels=False).probs
        p = part.loc[:, ["fold", "slide_id", "patient_id", "label", "split"]].copy()
        for j, c in enumerate(data.classes):
            p[f"prob_{c}"] = probs[:, j]
        p["pred"] = [data.classes[j] for j in probs.argmax(1)]
        preds.append(p)
    predictions = pd.concat(preds, ignore_index=True)
    return predictions.sort_values("slide_id", key=lambda s: s.map(data.unit_order)).reset_index(drop=True)


# ---------------------------------------------------------------------------------- checkpoints

def _plain(obj, where: str = "checkpoint"):
    """Convert to types ``torch.load(weights_only=True)`` accepts (tensors, plain containers)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, os.PathLike):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, where) for v in obj]
    raise TypeError(f"{where}: cannot store {type(obj).__name__} in a weights_only checkpoint")


def save_checkpoint(path: str | os.PathLike, result: TrainResult, meta: Mapping | None = None) -> None:
    """Write the best model and everything needed to rebuild and apply it, atomically."""
    ckpt = {
        "format_version": CHECKPOINT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        "model_name": result.model_name,
        "model_kwargs": _plain(result.model_kwargs, "model_kwargs"),
        "in_dim": int(result.in_dim),
        "classes": list(result.classes),
        "feature_mean": torch.as_tensor(result.feature_mean, dtype=torch.float32),
        "feature_std": torch.as_tensor(result.feature_std, dtype=torch.float32),
        "fold": None if result.fold is None else int(result.fold),
        "best_epoch": int(result.best_epoch),
        "class_weights": list(result.class_weights),
    }
    for k, v in (meta or {}).items():
        if k in ckpt:
            raise ValueError(f"meta key {k!r} would overwrite a checkpoint entry")
        ckpt[str(k)] = _plain(v, f"meta.{k}")
    # Serialised in memory, then written: a full disk is an OSError naming the file, not torch's
    # "unexpected pos"; the sha256 sidecar (model.pt.sha256) follows the checkpoint.
    import io as _io

    from slidesnake.integrity import sidecar_line, sidecar_path
    from slidesnake.io import disk_full_errors

    buf = _io.BytesIO()
    torch.save(ckpt, buf)
    data = buf.getvalue()
    for target, payload in ((Path(path), data),
                            (sidecar_path(path), sidecar_line(hashlib.sha256(data).hexdigest(), path).encode())):
        with disk_full_errors(target), atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(payload)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu", verify: bool = True) -> tuple[MILModel, dict]:
    """Rebuild the model of a checkpoint (eval mode) and return it with the checkpoint dict. ``verify``:
    check it against its sha256 sidecar first (:func:`slidesnake.integrity.verify_sidecar`)."""
    if verify:
        from slidesnake.integrity import verify_sidecar

        verify_sidecar(path)
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = create_model(ckpt["model_name"], ckpt["in_dim"], len(ckpt["classes"]), **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    return model, ckpt


@torch.no_grad()
def predict_output(model: MILModel, ckpt: Mapping, bag) -> tuple[np.ndarray, MILOutput]:
    """Class probabilities ``(n_classes,)`` and the model's full output for one bag of its
    ``bag_type`` (numpy or tensors), standardised as in training; the model is put in eval mode."""
    check_bag_type(bag, model.bag_type, "predict")
    reason = empty_reason(bag)
    if reason or (model.bag_type == "flat" and len(bag.shape) != 2):
        raise ValueError(f"predict needs a non-empty bag; got {reason or f'shape {tuple(bag.shape)}'}")
    dev = next(model.parameters()).device
    mean = torch.as_tensor(ckpt["feature_mean"], dtype=torch.float32)
    std = torch.as_tensor(ckpt["feature_std"], dtype=torch.float32)
    model.eval()
    out = model(_standardise(bag, mean, std, dev))
    return torch.softmax(out.logits.float(), dim=-1).cpu().numpy(), out


@torch.no_grad()
def predict_bag(model: MILModel, ckpt: Mapping, features) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``(n_classes,)`` and attention ``(N,)`` of one bag, standardised as in training.

    ``features``: a flat ``(N, D)`` bag, or a structured bag of the model's ``bag_type`` (then the
    attention is the model's ``MILOutput.attention``; :func:`predict_output` gives the extras).
    """
    if model.bag_type == "flat":
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"predict_bag needs a non-empty (N, D) bag; got shape {features.shape}")
    probs, out = predict_output(model, ckpt, features)
    return probs, out.attention.float().cpu().numpy()
