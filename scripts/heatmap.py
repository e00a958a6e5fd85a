"""Snakemake script of rule `heatmap`: out-of-fold attention of one slide over its thumbnail."""

import numpy as np
import pandas as pd

from slidesnake.heatmap import normalise, oof_fold, render, score_map
from slidesnake.io import save_figure, setup_logging
from slidesnake.slide import open_slide
from slidesnake.store import open_store
from slidesnake.training import load_checkpoint, predict_bag

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0])
p, slide_id = sm.params, sm.wildcards.slide
store = open_store(sm.input.store)
feats, coords, size = store.features(p.magnification), store.coords(p.magnification), store.size(p.magnification)
splits = pd.read_csv(sm.input.splits, dtype={"slide_id": str, "patient_id": str})

fold = oof_fold(splits, slide_id)
models = {int(path.split("fold_")[-1].split("/")[0]): path for path in sm.input.models}
use = [fold] if fold is not None else sorted(models)
log.info("%s: %s", slide_id, f"out-of-fold model of fold {fold}" if fold is not None
         else f"ensemble of folds {use} (slide in no test split)")
probs, att = [], []
for f in use:
    model, ckpt = load_checkpoint(models[f])
    if len(feats):
        pr, a = predict_bag(model, ckpt, feats)
        probs.append(pr)
        att.append(a)
classes = ckpt["classes"]

slide = open_slide(sm.input.slide, slide_id)
thumb = slide.get_thumbnail((p.thumbnail_size, p.thumbnail_size)).convert("RGB")
if att:
    attention = normalise(np.mean(att, axis=0), *p.percentiles)
    amap = score_map(coords, size, attention, slide.dimensions, thumb.size)
    prob = np.mean(probs, axis=0)
    pred = ", ".join(f"p({c}) = {v:.2f}" for c, v in zip(classes, prob))
else:
    amap = np.full(thumb.size[::-1], np.nan)
    pred = "no tissue tiles"
label = splits.loc[splits["slide_id"] == slide_id, "label"]
title = f"{slide_id}  (label: {label.iloc[0] if len(label) else '?'}; {pred}; {p.magnification:g}x)"
fig = render(thumb, amap, alpha=p.alpha, cmap=p.cmap, title=title)
save_figure(fig, sm.output.png, dpi=100)
