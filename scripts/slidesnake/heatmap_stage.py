"""The heatmap stage as a function, callable from Python without Snakemake: :func:`heatmap_job`.

``scripts/heatmap.py`` (rules ``heatmap`` and ``predict_heatmap``) only unpacks ``snakemake.*`` into
:class:`HeatmapSettings` / :class:`HeatmapOutputs` and calls it. The steps are functions of their
own: which fold models to use (:func:`heatmap_folds`), what they say about the slide
(:func:`slide_attention`: probabilities, attention layers, instance and patch scores), the title
(:func:`heatmap_title`) and the panels.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

PathLike = str | os.PathLike
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeatmapSettings:
    """Config ``heatmap`` (and the training magnification(s)) as one heatmap job uses them; the
    defaults live in config/config.yaml, not here."""

    magnification: float | None
    magnifications: Sequence[float] | None
    thumbnail_size: int
    alpha: float
    cmap: str
    percentiles: tuple[float, float]
    scale: str
    uniform_range: float
    smooth_sigma: float
    top_k: int
    patch_predictions: bool


@dataclass(frozen=True)
class HeatmapOutputs:
    png: PathLike
    tiles: PathLike
    geojson: PathLike
    top_tiles: PathLike


@dataclass
class SlideAttention:
    """What the fold models say about one slide: class probabilities, attention layers
    (magnification -> scores in the store's row order) and extras, one entry per model used."""

    classes: list
    bag_type: str
    boxes: dict = field(default_factory=dict)
    probs: list = field(default_factory=list)
    attention: list = field(default_factory=list)
    instance: list = field(default_factory=list)
    patch: list = field(default_factory=list)
    bars: list | None = None


def fold_of_path(path: PathLike) -> int:
    """``.../fold_<k>/model.pt`` -> ``k``."""
    return int(str(path).split("fold_")[-1].split("/")[0])


def heatmap_folds(models: Sequence[PathLike], splits: pd.DataFrame | None, slide_id: str) -> tuple[int | None, list[int]]:
    """The out-of-fold model's fold (None: the slide is in no single fold's test split, or new) and
    the folds whose models are used: that one, else every fold (the ensemble)."""
    from slidesnake.heatmap import oof_fold

    fold = oof_fold(splits, slide_id) if splits is not None else None
    return fold, [fold] if fold is not None else sorted(fold_of_path(p) for p in models)


def slide_attention(models: Mapping[int, PathLike], use: Sequence[int], store, *, slide_id: str,
                    settings: HeatmapSettings, case_stores: Sequence[PathLike] = (),
                    samples: pd.DataFrame | Callable[[], pd.DataFrame] | None = None,
                    log: logging.Logger | None = None,
                    fold_stores: Mapping[int, PathLike] | None = None) -> SlideAttention:
    """Apply the fold models ``use`` to the slide's bag (the bag their ``bag_type`` reads; ``samples``,
    the sample sheet or a function reading it, is needed for case bags only)."""
    from slidesnake.bagkinds import bag_kind
    from slidesnake.heatmap import instance_scores
    from slidesnake.predict import patch_probabilities
    from slidesnake.training import load_checkpoint, predict_output

    log = log or _log
    mag = float(settings.magnification) if settings.magnification is not None else None
    res, bag = None, None
    want_patch = bool(settings.patch_predictions)  # per-tile class probabilities, each tile alone as a bag
    for f in use:
        model, ckpt = load_checkpoint(models[f])
        if fold_stores:  # training.coupling: this fold's features of the slide (its last-round embedder)
            from slidesnake.store import open_store

            store = open_store(fold_stores[f])
        if res is None or fold_stores:  # the bag the model reads (slide, slide at every magnification, or case)
            res = res or SlideAttention(classes=list(ckpt["classes"]), bag_type=model.bag_type)
            kind = bag_kind(res.bag_type)
            bag, res.boxes = kind.heatmap_bag(
                store, magnification=mag,
                magnifications=ckpt.get("magnifications") or settings.magnifications,
                slide_id=slide_id, case_stores=list(case_stores),
                samples=(samples() if callable(samples) else samples) if kind.reads_sample_sheet else None)
            want_patch = want_patch and kind.scores_single_tiles  # one bag type for every fold
            if settings.patch_predictions and not want_patch:
                log.info("patch predictions skipped: %s reads %s bags, and a tile alone is not such a bag",
                         ckpt["model_name"], res.bag_type)
            if kind.scores_single_tiles and not len(bag):  # a flat bag without tiles
                bag = None
        if bag is None:
            continue
        pr, out = predict_output(model, ckpt, bag)
        layers = kind.attention_layers(out, mag, slide_id)
        res.probs.append(pr)
        if layers:
            res.attention.append(layers)
        if kind.scores_single_tiles and (score := instance_scores(model, out)) is not None:
            res.instance.append(score)  # e.g. CLAM's instance classifier
        if want_patch:
            res.patch.append(patch_probabilities(model, ckpt, bag))
        if f == use[0]:
            res.bars = kind.bars(out, slide_id)
    return res


def scale_description(scale: str, uniform_range: float) -> str:
    """How the attention panels are scaled, for their titles (config ``heatmap.scale``)."""
    if scale == "slide":
        return "percentile-normalised"
    return f"relative to uniform, log scale, 1/{uniform_range:g}x to {uniform_range:g}x"


def heatmap_title(slide_id: str, att: SlideAttention, splits: pd.DataFrame | None, magnification: float | None) -> str:
    """``<slide>  (label: <label>; p(c) = ...; <magnifications>)``."""
    from slidesnake.bagkinds import bag_kind

    if att.probs:
        prob = np.mean(att.probs, axis=0)
        pred = bag_kind(att.bag_type).prediction_prefix + ", ".join(f"p({c}) = {v:.2f}" for c, v in zip(att.classes, prob))
    else:
        pred = "no tissue tiles"
    label = splits.loc[splits["slide_id"] == slide_id, "label"] if splits is not None else []
    mags = ", ".join(f"{m:g}x" for m in (att.attention[0] if att.attention else [magnification]))
    label = label.iloc[0] if len(label) else ("?" if splits is not None else "none, new slide")
    return f"{slide_id}  (label: {label}; {pred}; {mags})"


def heatmap_job(*, slide: PathLike, store: PathLike, models: Sequence[PathLike], slide_id: str,
                settings: HeatmapSettings, outputs: HeatmapOutputs, splits: PathLike | None = None,
                samples: PathLike | None = None, case_stores: Sequence[PathLike] = (),
                log: logging.Logger | None = None, on_bad_slide: str = "fail") -> None:
    """Rules ``heatmap`` (``splits`` given: the out-of-fold model's attention, or the fold ensemble's
    for a slide no single fold tested) and ``predict_heatmap`` (no splits: a new slide, the fold
    ensemble's): the heatmap figure, the tile scores table, QuPath detections and the top / bottom
    tiles montage. A store marked excluded gives placeholder outputs saying why."""
    from slidesnake.coupling_rounds import coupled_stores
    from slidesnake.exclusion import log_excluded, write_excluded_heatmap_outputs
    from slidesnake.heatmap import (TILE_COLUMNS, render, render_panels, render_top_tiles, scale_attention,
                                    score_map, smooth, tile_table, tiles_geojson)
    from slidesnake.io import atomic_path, save_figure, write_table
    from slidesnake.samples import read_predict_sheet, read_sheet
    from slidesnake.slide import open_slide
    from slidesnake.splits import read_splits
    from slidesnake.store import open_store
    from slidesnake.tiling import TileReader
    from slidesnake.tissue import thumbnail

    log = log or _log
    # training.coupling: one store per fold (each fold's last-round embedder); else the slide's one store.
    # Checked against its integrity manifest: damaged -> one error, or excluded under on_bad_slide: skip
    fold_stores = coupled_stores(store)
    fs = open_store(next(iter(fold_stores.values())) if fold_stores else store, on_bad_slide=on_bad_slide)
    if fs.excluded:  # config on_bad_slide: skip excluded the slide: placeholder outputs saying why
        log_excluded(log, slide_id, fs.attrs.get("path", "-"), fs.excluded, upstream=True)
        write_excluded_heatmap_outputs(outputs, slide_id, fs.excluded, TILE_COLUMNS)
        return
    table = read_splits(splits) if splits is not None else None
    by_fold = {fold_of_path(p): p for p in models}
    fold, use = heatmap_folds(models, table, slide_id)
    log.info("%s: %s", slide_id, f"out-of-fold model of fold {fold}" if fold is not None
             else f"ensemble of folds {use} (no single fold tested the slide: held out of all, or new)")
    read_samples = read_sheet if table is not None else read_predict_sheet  # predict: the predict sheet
    # the sheet is read only for case bags (hierarchical models): the bag type comes with the first model
    att = slide_attention(by_fold, use, fs, slide_id=slide_id, settings=settings, case_stores=case_stores,
                          samples=lambda: read_samples(samples), log=log, fold_stores=fold_stores)
    mag = float(settings.magnification) if settings.magnification is not None else None

    wsi = open_slide(slide, slide_id)
    thumb = thumbnail(wsi, settings.thumbnail_size, slide_id=slide_id, path=slide)  # bounded memory
    maps, raw, norm = {}, {}, {}
    how = scale_description(settings.scale, settings.uniform_range)
    for m in (att.attention[0] if att.attention else {}):  # fold ensemble (slide in no test split): mean attention
        raw[m] = np.mean([a[m] for a in att.attention], axis=0)
        norm[m] = scale_attention(raw[m], settings.scale, percentiles=settings.percentiles,
                                  uniform_range=settings.uniform_range)
        coords, size = att.boxes[m]
        maps[f"attention at {m:g}x ({how})"] = smooth(
            score_map(coords, size, norm[m], wsi.dimensions, thumb.size), settings.smooth_sigma)
    tiles = tile_table(slide_id, fs, raw, norm,
                       {mag: np.mean(att.instance, axis=0)} if att.instance and len(att.instance) == len(att.attention)
                       else None)
    patch_columns = []
    if att.patch and len(att.patch) == len(att.attention) and len(tiles):  # flat bag: tiles are the bag's rows
        patch_prob = np.mean(att.patch, axis=0)  # (N, n_classes), mean over the models like the attention
        patch_columns = [f"patch_prob_{c}" for c in att.classes]
        for j, col in enumerate(patch_columns):
            tiles[col] = patch_prob[:, j]
        coords, size = att.boxes[mag]
        for j, c in enumerate(att.classes[1:], 1):  # one panel per class after the first (binary: the positive)
            maps[f"each tile alone: p({c}) (not normalised)"] = smooth(
                score_map(coords, size, patch_prob[:, j], wsi.dimensions, thumb.size), settings.smooth_sigma)
    write_table(tiles[[c for c in (*TILE_COLUMNS, "instance_score", *patch_columns) if c in tiles]], outputs.tiles)
    with atomic_path(outputs.geojson) as tmp:  # compact: one feature per tile
        tmp.write_text(json.dumps(tiles_geojson(tiles), separators=(",", ":")))
    if not maps:
        maps["attention (no tiles)"] = np.full(thumb.size[::-1], np.nan)
    title = heatmap_title(slide_id, att, table, mag)
    if len(maps) == 1 and not att.bars:
        fig = render(thumb, next(iter(maps.values())), alpha=settings.alpha, cmap=settings.cmap, title=title,
                     panel_title=f"attention ({how})")
    else:
        fig = render_panels(thumb, maps, alpha=settings.alpha, cmap=settings.cmap, title=title, bars=att.bars,
                            colorbar_label="attention / probability" if patch_columns else "attention")
    save_figure(fig, outputs.png, dpi=100)

    attrs = fs.attrs
    reader = TileReader(slide, int(attrs.get("tile_size", 256)), int(attrs.get("overlap", 0)),
                        bool(attrs.get("limit_bounds", False)), slide_id=slide_id)
    finest = tiles[tiles["magnification"] == tiles["magnification"].max()] if len(tiles) else tiles
    save_figure(render_top_tiles(reader, finest, settings.top_k,
                                 title=f"{slide_id}: top / bottom {settings.top_k} tiles by attention"),
                outputs.top_tiles, dpi=100)
