"""The registry of bag kinds: one object per ``MILModel.bag_type`` that owns what differs between them.

Every model declares the bag it reads (``"flat"``, ``"multiscale"``, ``"hierarchical"``; the bags
themselves are in :mod:`slidesnake.bags`). What differs by kind lives on its :class:`BagKind`, looked
up by name with :func:`bag_kind` (as the model and backbone registries do), instead of string
comparisons in every stage:

- ``load`` -- the bags read once from the feature stores (training, tuning, prediction: :func:`model_bags`);
- ``heatmap_bag`` -- the bag a heatmap applies the model to, and the level-0 boxes of each attention layer;
- ``attention_layers`` -- the slide's attention per magnification from a model output;
- ``unit`` / ``prediction_rows`` -- what one prediction is about (a slide, or a patient's case);
- ``read_magnifications`` / ``checkpoint_magnifications`` -- the magnifications the model reads;
- ``scores_single_tiles`` -- whether a tile alone is a bag of this kind (patch predictions).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from slidesnake.bags import (ExcludedBag, case_bag, case_rows, check_finite, empty_reason, excluded_reason,
                             multiscale_bag, n_instances, slide_stains, stores_by_slide, _resolve_mags)

_log = logging.getLogger("slidesnake.bags")


def _arr(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _boxes(store, m: float) -> tuple[np.ndarray, np.ndarray]:
    return store.coords(m), store.size(m)


class BagKind:
    """What one kind of bag means for loading, heatmaps and predictions (subclasses below)."""

    name: str = ""
    unit: str = "slide"               # what one bag (and one prediction row) is about
    prediction_prefix: str = ""       # heatmap titles: "case p(...)" for a patient's prediction
    scores_single_tiles: bool = False  # a tile alone is a bag of this kind (patch predictions)
    reads_sample_sheet: bool = False   # bags need the sheet's patient and stain columns

    def bars(self, output, slide_id: str | None) -> list | None:
        """Heatmap bar panel of a model output (a case's stain and slice weights); None: no panel."""
        return None

    def load(self, stores: Mapping[str, Path], slide_ids: Sequence[str], *, magnification: float | None,
             magnifications: Sequence[float] | None, samples: pd.DataFrame | None,
             log: logging.Logger, on_bad_slide: str = "fail") -> dict:
        """``on_bad_slide``: a damaged store (integrity manifest, slidesnake.integrity) raises ("fail")
        or is an ExcludedBag with the reason ("skip")."""
        raise NotImplementedError

    def heatmap_bag(self, store, *, magnification: float | None, magnifications: Sequence[float] | None,
                    slide_id: str | None, case_stores: Sequence | None, samples: pd.DataFrame | None):
        raise NotImplementedError

    def attention_layers(self, output, magnification: float | None, slide_id: str | None) -> dict[float, np.ndarray]:
        raise NotImplementedError

    def prediction_rows(self, splits_fold: pd.DataFrame) -> pd.DataFrame:
        """The splits rows of the prediction units (one per slide; one per patient for cases)."""
        return splits_fold

    def read_magnifications(self, magnification: float | None, magnifications: Sequence[float] | None) -> list[float]:
        """The magnifications whose tiles the model reads (a slide without tiles there is left out)."""
        return [float(magnification)]

    def checkpoint_magnifications(self, magnifications: Sequence[float] | None) -> list[float] | None:
        """What the checkpoint records as ``magnifications`` (the bag's scales; None when one)."""
        return None


class FlatKind(BagKind):
    """One slide: features ``(N, D)`` of one magnification."""

    name = "flat"
    scores_single_tiles = True

    def load(self, stores, slide_ids, *, magnification, magnifications=None, samples=None, log=_log,
             on_bad_slide: str = "fail") -> dict:
        from slidesnake.store import open_store

        bags = {}
        # thousands of stores take minutes: one progress line about every 10% (readable in SLURM logs)
        step, t0, tiles = max(1, math.ceil(len(slide_ids) / 10)), time.perf_counter(), 0
        for i, sid in enumerate(slide_ids, 1):
            store = open_store(stores[sid], on_bad_slide=on_bad_slide)
            if reason := excluded_reason(store):
                log.warning("slide %s %s; left out of training", sid, reason)
                bags[sid] = ExcludedBag(reason)
                continue
            mags = store.magnifications
            mag = magnification
            if mag is not None and not any(math.isclose(float(mag), m) for m in mags):
                raise ValueError(f"{stores[sid]}: no features at {float(mag):g}x; store has {mags}")
            bags[sid] = store.features(mag)
            check_finite(bags[sid], sid, stores[sid], mag)
            tiles += len(bags[sid])
            if len(slide_ids) >= 100 and (i % step == 0 or i == len(slide_ids)):
                dt = time.perf_counter() - t0
                log.info("read %d/%d bags (%3.0f%%), %d tiles, %.1f bags/s", i, len(slide_ids),
                         100 * i / len(slide_ids), tiles, i / dt if dt > 0 else float("nan"))
        log.info("read %d bags (%s tiles in all)", len(bags),
                 sum(len(b) for b in bags.values() if not isinstance(b, ExcludedBag)))
        return bags

    def heatmap_bag(self, store, *, magnification, magnifications=None, slide_id=None, case_stores=None,
                    samples=None):
        return store.features(magnification), {magnification: _boxes(store, magnification)}

    def attention_layers(self, output, magnification, slide_id=None):
        return {magnification: _arr(output.attention)}


class MultiscaleKind(BagKind):
    """One slide at every magnification of ``training.magnifications``, with parent links."""

    name = "multiscale"

    def load(self, stores, slide_ids, *, magnification=None, magnifications, samples=None, log=_log,
             on_bad_slide: str = "fail") -> dict:
        from slidesnake.store import open_store

        if not magnifications or len(magnifications) < 2:
            raise ValueError(f"multiscale bags need at least two magnifications "
                             f"(config training.magnifications); got {magnifications}")
        bags = {}
        for sid in slide_ids:
            store = open_store(stores[sid], on_bad_slide=on_bad_slide)
            if reason := excluded_reason(store):
                log.warning("slide %s %s; left out of training", sid, reason)
                bags[sid] = ExcludedBag(reason)
                continue
            bags[sid] = multiscale_bag(store, magnifications)
            for m, a in bags[sid].features.items():
                check_finite(a, sid, stores[sid], m)
        for sid, bag in bags.items():
            if isinstance(bag, ExcludedBag):
                continue
            missing = {f"{f:g}x->{c:g}x": int((np.asarray(p) < 0).sum()) for (f, c), p in bag.parents.items()}
            log.debug("%s: tiles %s; tiles without parent %s", sid,
                      {f"{m:g}x": len(a) for m, a in bag.features.items()}, missing)
        log.info("read %d multiscale bags at %s (%s tiles in all)", len(bags),
                 ", ".join(f"{m:g}x" for m in sorted(float(m) for m in magnifications)),
                 sum(n_instances(b) for b in bags.values()))
        return bags

    def heatmap_bag(self, store, *, magnification=None, magnifications, slide_id=None, case_stores=None,
                    samples=None):
        # None when a magnification has no tile, as training skips such slides
        bag = multiscale_bag(store, magnifications)
        boxes = {m: _boxes(store, m) for m in bag.magnifications}
        return (None if empty_reason(bag) else bag), boxes

    def attention_layers(self, output, magnification=None, slide_id=None):
        return {float(m): _arr(a) for m, a in output.extras["attention"].items()}

    def read_magnifications(self, magnification, magnifications):
        return [float(m) for m in magnifications]

    def checkpoint_magnifications(self, magnifications):
        return [float(m) for m in magnifications] if magnifications else None


class HierarchicalKind(BagKind):
    """One case (patient): its slides by stain; the prediction unit is the patient."""

    name = "hierarchical"
    unit = "patient"
    prediction_prefix = "case "
    reads_sample_sheet = True

    def bars(self, output, slide_id):
        """``(label, weight, is_this_slide)`` for every stain (its stain weight) followed by its slides
        (slice weight within the stain)."""
        bars = []
        ex = output.extras
        for k, stain in enumerate(ex["stains"]):
            bars.append((f"stain {stain}", float(ex["stain_attention"][k]), False))
            for sid, w in zip(ex["slice_ids"][stain], ex["slice_attention"][stain]):
                bars.append((f"  {sid}", float(w), sid == slide_id))
        return bars

    def load(self, stores, slide_ids, *, magnification, magnifications=None, samples, log=_log,
             on_bad_slide: str = "fail") -> dict:
        from slidesnake.store import open_store

        if samples is None:
            raise ValueError("hierarchical (case) bags need the sample sheet (patient_id and stain columns)")
        sheet = samples.reset_index(drop=True)
        sheet = sheet.assign(slide_id=sheet["slide_id"].astype(str), patient_id=sheet["patient_id"].astype(str))
        unknown = sorted(set(map(str, slide_ids)) - set(sheet["slide_id"]))
        if unknown:
            raise KeyError(f"slide(s) {unknown[:10]} not in the sample sheet")
        stain = slide_stains(sheet)
        patient = dict(zip(sheet["slide_id"], sheet["patient_id"]))
        feats = {}
        for sid in slide_ids:
            store = open_store(stores[sid], on_bad_slide=on_bad_slide)
            if reason := excluded_reason(store):
                feats[sid] = ExcludedBag(reason)
                continue
            mag = _resolve_mags(store, [magnification])[0] if magnification is not None else None
            feats[sid] = store.features(mag)
            check_finite(feats[sid], sid, stores[sid], mag)
        by_case: dict[str, list[tuple[str, str]]] = {}
        for sid in slide_ids:
            by_case.setdefault(patient[str(sid)], []).append((str(sid), stain[str(sid)]))
        bags = {pid: case_bag(pid, slides, feats, log) for pid, slides in by_case.items()}
        n_slides = sum(len(ids) for b in bags.values() for ids in b.slide_ids.values())
        log.info("read %d case bags: %d slides, stains %s (%s tiles in all)", len(bags), n_slides,
                 sorted({s for b in bags.values() for s in b.stains}), sum(n_instances(b) for b in bags.values()))
        return bags

    def heatmap_bag(self, store, *, magnification, magnifications=None, slide_id, case_stores, samples):
        # the case bag of the slide's patient (all of its slides), None when the case has no tile
        by_id = stores_by_slide(case_stores)
        sheet = samples.reset_index(drop=True)
        patient = str(sheet.loc[sheet["slide_id"].astype(str) == str(slide_id), "patient_id"].iloc[0])
        ids = [s for s in sheet.loc[sheet["patient_id"].astype(str) == patient, "slide_id"].astype(str) if s in by_id]
        bag = self.load(by_id, ids, magnification=magnification, samples=sheet, log=_log)[patient]
        return (None if empty_reason(bag) else bag), {magnification: _boxes(store, magnification)}

    def attention_layers(self, output, magnification, slide_id):
        # the slide's own patch attention (empty when the slide had no tile)
        att = output.extras["patch_attention"].get(slide_id)
        return {} if att is None else {magnification: _arr(att)}

    def prediction_rows(self, splits_fold):
        return case_rows(splits_fold)


BAG_KINDS: dict[str, BagKind] = {k.name: k for k in (FlatKind(), MultiscaleKind(), HierarchicalKind())}


def bag_kind(name: str) -> BagKind:
    """The :class:`BagKind` of a ``bag_type`` name."""
    try:
        return BAG_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown bag_type {name!r}; known: {sorted(BAG_KINDS)}") from None


def model_bags(stores: Sequence[str | os.PathLike], slide_ids: Sequence[str] | None, *, bag_type: str,
               magnification: float | None, magnifications: Sequence[float] | None = None,
               samples: pd.DataFrame | str | os.PathLike | None = None, log: logging.Logger | None = None,
               on_bad_slide: str = "fail") -> dict:
    """The bags a model of ``bag_type`` reads (:func:`slidesnake.training.load_bags`): the slides at
    ``magnification`` (flat), at every one of ``magnifications`` (multiscale), or each patient's
    slides by stain (hierarchical: ``samples``, a sheet or its path, gives patient and stain)."""
    from slidesnake.samples import read_sheet
    from slidesnake.training import load_bags

    case = bag_kind(bag_type).reads_sample_sheet  # only case bags read the sample sheet
    if case and isinstance(samples, (str, os.PathLike)):
        samples = read_sheet(samples)
    return load_bags(list(stores), None if magnification is None else float(magnification),
                     None if slide_ids is None else list(slide_ids), log=log, bag_type=bag_type,
                     magnifications=[float(m) for m in magnifications] if magnifications else None, samples=samples if case else None,
                     on_bad_slide=on_bad_slide)
