"""Snakemake script of rules `heatmap` (out-of-fold attention of one slide over its thumbnail) and
`predict_heatmap` (a new slide: no splits input, the fold ensemble's attention)."""

import json

import numpy as np
import pandas as pd

from slidesnake.heatmap import (TILE_COLUMNS, attention_layers, case_weights, heatmap_bag, oof_fold,
                                scale_attention, instance_scores, render, render_panels, render_top_tiles, score_map, smooth,
                                tile_table, tiles_geojson)
from slidesnake.exclusion import log_excluded, write_excluded_heatmap_outputs
from slidesnake.io import atomic_path, save_figure, setup_logging, write_table
from slidesnake.predict import patch_probabilities, supports_patch_predictions
from slidesnake.samples import read_predict_sheet, read_sheet
from slidesnake.slide import open_slide
from slidesnake.store import open_store
from slidesnake.tissue import thumbnail
from slidesnake.tiling import TileReader
from slidesnake.training import load_checkpoint, predict_output

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
p, slide_id = sm.params, sm.wildcards.slide
store = open_store(sm.input.store)
if store.excluded:  # config on_bad_slide: skip excluded the slide: placeholder outputs saying why
    log_excluded(log, slide_id, store.root.attrs.get("path", "-"), store.excluded, upstream=True)
    write_excluded_heatmap_outputs(sm.output, slide_id, store.excluded, TILE_COLUMNS)
    raise SystemExit(0)
# rule predict_heatmap has no splits: a new slide, in no fold
splits = (pd.read_csv(sm.input.splits, dtype={"slide_id": str, "patient_id": str})
          if hasattr(sm.input, "splits") else None)
read_samples = read_sheet if splits is not None else read_predict_sheet

fold = oof_fold(splits, slide_id) if splits is not None else None
models = {int(path.split("fold_")[-1].split("/")[0]): path for path in sm.params.models}
use = [fold] if fold is not None else sorted(models)
log.info("%s: %s", slide_id, f"out-of-fold model of fold {fold}" if fold is not None
         else f"ensemble of folds {use} (no single fold tested the slide: held out of all, or new)")
mag = float(p.magnification)
probs, att, inst, bars, bag, bag_type = [], [], [], None, None, None
patch = []  # heatmap.patch_predictions: per-tile class probabilities, each tile alone as a bag
want_patch = bool(getattr(p, "patch_predictions", False))
for f in use:
    model, ckpt = load_checkpoint(models[f])
    if bag_type is None:  # the bag the model reads (slide, slide at every magnification, or case)
        bag_type = model.bag_type
        bag, boxes = heatmap_bag(
            bag_type, store, magnification=mag, magnifications=ckpt.get("magnifications") or p.magnifications,
            slide_id=slide_id, case_stores=list(sm.input.case_stores),
            samples=read_samples(sm.input.samples) if bag_type == "hierarchical" else None)
        want_patch = want_patch and supports_patch_predictions(model)  # one bag type for every fold
        if getattr(p, "patch_predictions", False) and not want_patch:
            log.info("patch predictions skipped: %s reads %s bags, and a tile alone is not such a bag",
                     ckpt["model_name"], bag_type)
        if bag_type == "flat" and not len(bag):
            bag = None
    if bag is not None:
        pr, out = predict_output(model, ckpt, bag)
        layers = attention_layers(out, bag_type, mag, slide_id)
        probs.append(pr)
        if layers:
            att.append(layers)
        if bag_type == "flat" and (score := instance_scores(model, out)) is not None:
            inst.append(score)  # e.g. CLAM's instance classifier
        if want_patch:
            patch.append(patch_probabilities(model, ckpt, bag))
        if bag_type == "hierarchical" and f == use[0]:
            bars = case_weights(out, slide_id)
classes = ckpt["classes"]

slide = open_slide(sm.input.slide, slide_id)
thumb = thumbnail(slide, p.thumbnail_size, slide_id=slide_id, path=sm.input.slide)  # bounded memory
maps, raw, norm = {}, {}, {}
scale, factor = getattr(p, "scale", None) or ("slide", 4.0)  # config heatmap.scale, uniform_range
how = "percentile-normalised" if scale == "slide" else f"relative to uniform, log scale, 1/{factor:g}x to {factor:g}x"
for m in (att[0] if att else {}):  # fold ensemble (slide in no test split): mean attention
    raw[m] = np.mean([a[m] for a in att], axis=0)
    norm[m] = scale_attention(raw[m], scale, percentiles=p.percentiles, uniform_range=factor)
    coords, size = boxes[m]
    maps[f"attention at {m:g}x ({how})"] = smooth(
        score_map(coords, size, norm[m], slide.dimensions, thumb.size), p.smooth_sigma)
tiles = tile_table(slide_id, store, raw, norm,
                   {mag: np.mean(inst, axis=0)} if inst and len(inst) == len(att) else None)
patch_columns = []
if patch and len(patch) == len(att) and len(tiles):  # flat bag: tiles are the bag's rows, in order
    patch_prob = np.mean(patch, axis=0)  # (N, n_classes), mean over the models like the attention
    patch_columns = [f"patch_prob_{c}" for c in classes]
    for j, col in enumerate(patch_columns):
        tiles[col] = patch_prob[:, j]
    coords, size = boxes[mag]
    for j, c in enumerate(classes[1:], 1):  # one panel per class after the first (binary: the positive)
        maps[f"each tile alone: p({c}) (not normalised)"] = smooth(
            score_map(coords, size, patch_prob[:, j], slide.dimensions, thumb.size), p.smooth_sigma)
write_table(tiles[[c for c in (*TILE_COLUMNS, "instance_score", *patch_columns) if c in tiles]], sm.output.tiles)
with atomic_path(sm.output.geojson) as tmp:  # compact: one feature per tile
    tmp.write_text(json.dumps(tiles_geojson(tiles), separators=(",", ":")))
if probs:
    prob = np.mean(probs, axis=0)
    unit = "case " if bag_type == "hierarchical" else ""
    pred = unit + ", ".join(f"p({c}) = {v:.2f}" for c, v in zip(classes, prob))
else:
    pred = "no tissue tiles"
if not maps:
    maps["attention (no tiles)"] = np.full(thumb.size[::-1], np.nan)
label = splits.loc[splits["slide_id"] == slide_id, "label"] if splits is not None else []
mags = ", ".join(f"{m:g}x" for m in (att[0] if att else [mag]))
label = label.iloc[0] if len(label) else ("?" if splits is not None else "none, new slide")
title = f"{slide_id}  (label: {label}; {pred}; {mags})"
if len(maps) == 1 and not bars:
    fig = render(thumb, next(iter(maps.values())), alpha=p.alpha, cmap=p.cmap, title=title)
else:
    fig = render_panels(thumb, maps, alpha=p.alpha, cmap=p.cmap, title=title, bars=bars,
                        colorbar_label="attention / probability" if patch_columns else "attention")
save_figure(fig, sm.output.png, dpi=100)

attrs = store.attrs
reader = TileReader(sm.input.slide, int(attrs.get("tile_size", 256)), int(attrs.get("overlap", 0)),
                    bool(attrs.get("limit_bounds", False)), slide_id=slide_id)
finest = tiles[tiles["magnification"] == tiles["magnification"].max()] if len(tiles) else tiles
save_figure(render_top_tiles(reader, finest, p.top_k, title=f"{slide_id}: top / bottom {p.top_k} tiles by attention"),
            sm.output.top_tiles, dpi=100)
