"""Bags: what a MIL model consumes, built once from the Zarr feature stores.

Every model declares the bag it reads with the class attribute ``MILModel.bag_type``:

``"flat"``
    one slide: features ``(N, D)`` of one magnification (an ``np.ndarray`` / ``Tensor``).
``"multiscale"``
    one slide: :class:`MultiscaleBag` -- ``features[mag]`` ``(N_mag, D)`` for every magnification
    and, for every (finer, coarser) pair, ``parents[(finer, coarser)]`` ``(N_finer,)`` int64: the row
    of the coarser tile that contains each finer tile (:func:`slidesnake.geometry.parent_indices` on
    the stores' level-0 ``coords`` / ``size``), ``-1`` when that tile was filtered out.
``"hierarchical"``
    one case (patient): :class:`CaseBag` -- ``stains[stain]`` is a list of ``(N_slice, D)`` arrays,
    one per slide of that stain (the sample sheet's ``stain`` column), ``slide_ids[stain]`` the
    matching slide ids. The prediction unit is the patient: see :func:`case_rows`.

The helpers below (:func:`feature_arrays`, :func:`map_features`, :func:`to_device`,
:func:`empty_reason`) treat the three kinds alike, so the training loop does not branch on them.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

BAG_TYPES = ("flat", "multiscale", "hierarchical")
#: Stain name given to slides whose sample-sheet ``stain`` is empty (or to every slide without the column).
DEFAULT_STAIN = "unspecified"

_log = logging.getLogger("slidesnake.bags")


@dataclass
class MultiscaleBag:
    """One slide at several magnifications, with the containing coarser tile of every tile."""

    features: dict[float, Any]                   # magnification -> (N_mag, D), ascending magnification
    parents: dict[tuple[float, float], Any] = field(default_factory=dict)  # (finer, coarser) -> (N_finer,)

    @property
    def magnifications(self) -> list[float]:
        return sorted(self.features)


@dataclass
class CaseBag:
    """One case (patient): per stain, one feature array per slide (slice)."""

    stains: dict[str, list]                      # stain -> [(N_slice, D) per slide]
    slide_ids: dict[str, list[str]]              # stain -> slide ids, parallel to ``stains``
    case_id: str = ""

    def slides(self) -> list[tuple[str, int, str]]:
        """``(stain, index, slide_id)`` of every slide, in bag order."""
        return [(s, i, sid) for s, ids in self.slide_ids.items() for i, sid in enumerate(ids)]


@dataclass
class ExcludedBag:
    """Stands in for the bag of a slide (or case) left out of training, with the reason: a feature
    store marked excluded (config ``on_bad_slide: skip``, :mod:`slidesnake.exclusion`). Training
    skips it like an empty bag (:func:`empty_reason`), logging the reason."""

    reason: str


class NonFiniteError(ValueError):
    """NaN / Inf in a slide's features or in a training loss; the message is one line naming the
    slide (and fold and epoch) and the fix."""


class NonFiniteLossError(NonFiniteError, RuntimeError):
    """A non-finite loss: training diverged (also a RuntimeError, which tuning treats as a failed trial)."""


def check_finite(features, slide_id: str, path, magnification: float | None) -> None:
    """Raise NonFiniteError when a slide's features hold NaN / Inf."""
    a = np.asarray(features)
    if a.size and not np.isfinite(a).all():
        rows = int((~np.isfinite(a).reshape(len(a), -1).all(axis=1)).sum())
        at = f" at {float(magnification):g}x" if magnification is not None else ""
        raise NonFiniteError(
            f"slide {slide_id!r} ({path}): {rows} of {len(a)} tiles have non-finite (NaN/Inf) features{at}; "
            "delete its feature store and extract it again (check features.weights)")


def excluded_reason(store) -> str | None:
    """``"excluded at <stage>: <reason>"`` (:func:`slidesnake.exclusion.describe`) for a store marked
    excluded, else None."""
    from slidesnake.exclusion import describe

    return describe(store.excluded) if store.excluded else None


# ---------------------------------------------------------------------------------- generic helpers

def bag_type_of(bag) -> str:
    if isinstance(bag, MultiscaleBag):
        return "multiscale"
    if isinstance(bag, CaseBag):
        return "hierarchical"
    return "flat"


def check_bag_type(bag, bag_type: str, where: str = "bag") -> None:
    if bag_type not in BAG_TYPES:
        raise ValueError(f"unknown bag_type {bag_type!r}; expected one of {BAG_TYPES}")
    got = bag_type_of(bag)
    if got != bag_type and not isinstance(bag, ExcludedBag):
        raise TypeError(f"{where}: the model reads {bag_type!r} bags but got a {got!r} bag "
                        f"({type(bag).__name__}); build bags with load_bags(..., bag_type={bag_type!r})")


def feature_arrays(bag) -> list:
    """Every feature array of a bag (flat: the bag itself; excluded: none)."""
    if isinstance(bag, ExcludedBag):
        return []
    if isinstance(bag, MultiscaleBag):
        return list(bag.features.values())
    if isinstance(bag, CaseBag):
        return [a for arrays in bag.stains.values() for a in arrays]
    return [bag]


def map_features(bag, fn: Callable):
    """The same bag with ``fn`` applied to every feature array (parents and ids are kept)."""
    if isinstance(bag, MultiscaleBag):
        return MultiscaleBag({m: fn(a) for m, a in bag.features.items()}, dict(bag.parents))
    if isinstance(bag, CaseBag):
        return CaseBag({s: [fn(a) for a in arrays] for s, arrays in bag.stains.items()},
                       {s: list(ids) for s, ids in bag.slide_ids.items()}, bag.case_id)
    return fn(bag)


def to_device(bag, device: torch.device | str):
    """Move every tensor of a (tensor) bag to ``device``; parent indices become int64 tensors."""
    def move(a):
        return torch.as_tensor(a).to(device)

    if isinstance(bag, MultiscaleBag):
        return MultiscaleBag({m: move(a) for m, a in bag.features.items()},
                             {k: torch.as_tensor(np.asarray(p) if not torch.is_tensor(p) else p,
                                                 dtype=torch.long).to(device) for k, p in bag.parents.items()})
    return map_features(bag, move)


def n_instances(bag) -> int:
    return int(sum(len(a) for a in feature_arrays(bag)))


def feature_dims(bag) -> set[int]:
    return {int(np.shape(a)[1]) for a in feature_arrays(bag)}


def empty_reason(bag) -> str | None:
    """Why a bag cannot be used (None when it can): excluded, no tile at all, or none at some magnification."""
    if isinstance(bag, ExcludedBag):
        return bag.reason
    if isinstance(bag, MultiscaleBag):
        empty = [f"{m:g}x" for m, a in bag.features.items() if len(a) == 0]
        return f"no tiles at {', '.join(empty)}" if empty else None
    if n_instances(bag) == 0:
        return "empty bag (0 tiles)"
    return None


# ------------------------------------------------------------------------------------------- builders

def multiscale_bag(store, magnifications: Sequence[float]) -> MultiscaleBag:
    """Features of each magnification of an open :class:`~slidesnake.store.FeatureStore` and the
    parent rows of every (finer, coarser) pair."""
    from slidesnake.geometry import parent_indices

    mags = sorted(_resolve_mags(store, magnifications))
    feats = {m: store.features(m) for m in mags}
    boxes = {m: (store.coords(m), store.size(m)) for m in mags}
    parents = {}
    for i, coarse in enumerate(mags):
        for fine in mags[i + 1:]:
            parents[(fine, coarse)] = parent_indices(*boxes[fine], *boxes[coarse])
    return MultiscaleBag(feats, parents)


def _resolve_mags(store, magnifications: Sequence[float]) -> list[float]:
    have = store.magnifications
    out = []
    for m in magnifications:
        hit = [h for h in have if math.isclose(float(m), h)]
        if not hit:
            raise ValueError(f"{store.path}: no features at {float(m):g}x; store has {have}")
        out.append(hit[0])
    if len(set(out)) != len(out):
        raise ValueError(f"repeated magnification in {list(magnifications)}")
    return out


def slide_stains(samples: pd.DataFrame) -> pd.Series:
    """slide_id -> stain name (empty or missing stain: :data:`DEFAULT_STAIN`)."""
    df = samples.reset_index(drop=True)
    if "stain" in df.columns:
        stain = df["stain"].astype(object).where(df["stain"].notna(), "").astype(str).str.strip()
    else:
        stain = pd.Series([""] * len(df))
    stain = stain.where(stain != "", DEFAULT_STAIN)
    return pd.Series(stain.to_numpy(), index=df["slide_id"].astype(str).to_numpy())


def case_bag(case_id: str, slides: Sequence[tuple[str, str]], features: Mapping[str, np.ndarray],
             log: logging.Logger | None = None) -> CaseBag:
    """A case from ``(slide_id, stain)`` pairs and each slide's ``(N, D)`` features.

    Stains are ordered by name and slides by id within a stain. Slides with no tiles are left out
    (warning); a stain without a non-empty slide is left out.
    """
    log = log or _log
    stains: dict[str, list] = {}
    ids: dict[str, list[str]] = {}
    for sid, stain in sorted(slides, key=lambda t: (t[1], t[0])):
        x = features[sid]
        if isinstance(x, ExcludedBag):
            log.warning("case %s: slide %s (%s) %s; left out of the case", case_id, sid, stain, x.reason)
            continue
        if len(x) == 0:
            log.warning("case %s: slide %s (%s) has no tiles; left out of the case", case_id, sid, stain)
            continue
        stains.setdefault(stain, []).append(x)
        ids.setdefault(stain, []).append(sid)
    return CaseBag(stains, ids, str(case_id))


def case_rows(splits_fold: pd.DataFrame) -> pd.DataFrame:
    """One row per patient of one fold's splits: the prediction unit of hierarchical models.

    ``slide_id`` holds the patient id (so prediction tables keep their columns and
    ``evaluate.summarize`` works unchanged); ``label`` and ``split`` are the patient's.
    """
    df = splits_fold.copy()
    for c in ("slide_id", "patient_id", "label", "split"):
        df[c] = df[c].astype(str)
    for col in ("label", "split"):
        n = df.groupby("patient_id")[col].nunique()
        if (n > 1).any():
            raise ValueError(f"patient(s) {n.index[n > 1].tolist()[:10]} have slides with different {col}s; "
                             "a case needs one")
    first = df.drop_duplicates("patient_id", keep="first")
    out = first.loc[:, ["fold", "patient_id", "label", "split"]].copy()
    out.insert(1, "slide_id", out["patient_id"])
    return out.reset_index(drop=True)


def load_structured_bags(
    stores: Mapping[str, Path],
    bag_type: str,
    slide_ids: Sequence[str],
    *,
    magnification: float | None = None,
    magnifications: Sequence[float] | None = None,
    samples: pd.DataFrame | None = None,
    log: logging.Logger | None = None,
    on_bad_slide: str = "fail",
) -> dict[str, MultiscaleBag | CaseBag]:
    """Multiscale bags keyed by slide_id, or case bags keyed by patient_id (see module docstring).

    ``stores`` maps slide_id -> store path and must cover ``slide_ids``. A damaged store: as in
    :func:`slidesnake.training.load_bags` (``on_bad_slide``).
    """
    from slidesnake.bagkinds import bag_kind

    if bag_type not in ("multiscale", "hierarchical"):
        raise ValueError(f"load_structured_bags builds 'multiscale' or 'hierarchical' bags, not {bag_type!r}")
    return bag_kind(bag_type).load(stores, slide_ids, magnification=magnification, magnifications=magnifications,
                                   samples=samples, log=log or _log, on_bad_slide=on_bad_slide)


def stores_by_slide(stores: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """slide_id -> store path (``<slide_id>.zarr``); two stores of one slide are an error."""
    by_id: dict[str, Path] = {}
    for p in stores:
        name = Path(p).name
        sid = name[: -len(".zarr")] if name.endswith(".zarr") else name
        if sid in by_id:
            raise ValueError(f"two feature stores for slide {sid!r}: {by_id[sid]} and {p}")
        by_id[sid] = Path(p)
    return by_id
