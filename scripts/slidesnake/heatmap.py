"""Attention heatmaps over slide thumbnails.

Tile scores are placed by their level-0 boxes (so the map sits exactly on the tissue whatever the
magnification), overlapping tiles are averaged, and scores are percentile-normalised within the
slide before they are blended over the thumbnail.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def oof_fold(splits: pd.DataFrame, slide_id: str) -> int | None:
    """The fold whose model did not train on ``slide_id`` (it is that fold's test slide)."""
    rows = splits[(splits["slide_id"] == slide_id) & (splits["split"] == "test")]
    return int(rows["fold"].iloc[0]) if len(rows) else None


def normalise(scores: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Clip to the [low, high] percentiles of the slide and scale to [0, 1]."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    lo, hi = np.percentile(scores, [low, high])
    if hi <= lo:
        return np.full_like(scores, 0.5)
    return np.clip((scores - lo) / (hi - lo), 0.0, 1.0)


def score_map(coords: np.ndarray, size: np.ndarray, scores: np.ndarray,
              slide_dims: tuple[int, int], map_dims: tuple[int, int]) -> np.ndarray:
    """A (H, W) map at ``map_dims`` (width, height) of the mean score of the tiles covering each pixel.

    Pixels covered by no tile are NaN. Tile boxes are level-0 ``coords`` (x, y) and ``size`` (w, h).
    """
    width, height = map_dims
    sx, sy = width / slide_dims[0], height / slide_dims[1]
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    for (x, y), (w, h), s in zip(coords, size, scores):
        x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        x1 = max(x0 + 1, int(np.ceil((x + w) * sx)))
        y1 = max(y0 + 1, int(np.ceil((y + h) * sy)))
        total[y0:y1, x0:x1] += s
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def render(thumbnail, amap: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet", title: str = ""):
    """Figure with the plain thumbnail beside the attention overlay and a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb = np.asarray(thumbnail)
    h, w = thumb.shape[:2]
    fig_w = 2 * 6.0 * w / max(w, h) + 1.2
    fig, axes = plt.subplots(1, 2, figsize=(fig_w, 6.0 * h / max(w, h) + 0.6), constrained_layout=True)
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    axes[1].imshow(thumb)
    im = axes[1].imshow(np.ma.masked_invalid(amap), cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                        interpolation="nearest")
    axes[1].set_title("attention (percentile-normalised)")
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02, label="attention")
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------- structured bags

def heatmap_bag(bag_type: str, store, *, magnification: float | None = None, magnifications=None,
                slide_id: str | None = None, case_stores=None, samples: pd.DataFrame | None = None):
    """The bag a model of ``bag_type`` reads for a slide's heatmap, and each attention layer's tiles.

    Returns ``(bag, boxes)`` where ``boxes`` maps a magnification to the level-0 ``(coords, size)``
    of the slide's tiles there: flat -- the slide at ``magnification``; multiscale -- the slide at
    every one of ``magnifications`` (``bag`` is ``None`` when a magnification has no tile, as training
    skips such slides); hierarchical -- the case bag of the slide's patient (all of its slides:
    ``case_stores``, with patient and stain from ``samples``), ``None`` when the case has no tile.
    """
    from slidesnake.bags import empty_reason, load_structured_bags, multiscale_bag, stores_by_slide

    if bag_type == "flat":
        return store.features(magnification), {magnification: (store.coords(magnification), store.size(magnification))}
    if bag_type == "multiscale":
        bag = multiscale_bag(store, magnifications)
        boxes = {m: (store.coords(m), store.size(m)) for m in bag.magnifications}
        return (None if empty_reason(bag) else bag), boxes
    if bag_type == "hierarchical":
        by_id = stores_by_slide(case_stores)
        sheet = samples.reset_index(drop=True)
        patient = str(sheet.loc[sheet["slide_id"].astype(str) == str(slide_id), "patient_id"].iloc[0])
        ids = [s for s in sheet.loc[sheet["patient_id"].astype(str) == patient, "slide_id"].astype(str) if s in by_id]
        bag = load_structured_bags(by_id, "hierarchical", ids, magnification=magnification, samples=sheet)[patient]
        boxes = {magnification: (store.coords(magnification), store.size(magnification))}
        return (None if empty_reason(bag) else bag), boxes
    raise ValueError(f"unknown bag_type {bag_type!r}")


def attention_layers(output, bag_type: str, magnification: float | None = None,
                     slide_id: str | None = None) -> dict[float, np.ndarray]:
    """The slide's attention per magnification from a model output: flat -- ``attention``;
    multiscale -- ``extras["attention"]`` (every magnification); hierarchical -- the slide's own
    patch attention ``extras["patch_attention"][slide_id]`` (empty when the slide had no tile)."""
    def arr(t):
        return t.detach().float().cpu().numpy()

    if bag_type == "flat":
        return {magnification: arr(output.attention)}
    if bag_type == "multiscale":
        return {float(m): arr(a) for m, a in output.extras["attention"].items()}
    att = output.extras["patch_attention"].get(slide_id)
    return {} if att is None else {magnification: arr(att)}


def case_weights(output, slide_id: str | None = None) -> list[tuple[str, float, bool]]:
    """Bars of a hierarchical output: ``(label, weight, is_this_slide)`` for every stain (its stain
    weight) followed by its slides (slice weight within the stain)."""
    bars = []
    ex = output.extras
    for k, stain in enumerate(ex["stains"]):
        bars.append((f"stain {stain}", float(ex["stain_attention"][k]), False))
        for sid, w in zip(ex["slice_ids"][stain], ex["slice_attention"][stain]):
            bars.append((f"  {sid}", float(w), sid == slide_id))
    return bars


def render_panels(thumbnail, maps: dict, *, alpha: float = 0.5, cmap: str = "jet", title: str = "",
                  bars: list[tuple[str, float, bool]] | None = None):
    """Thumbnail, one attention overlay per entry of ``maps`` (panel title -> (H, W) map in [0, 1]),
    and optionally a bar plot of ``(label, weight, highlight)`` (e.g. stain and slice weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb = np.asarray(thumbnail)
    h, w = thumb.shape[:2]
    n = 1 + len(maps) + (1 if bars else 0)
    panel_w = 5.0 * w / max(w, h)
    fig, axes = plt.subplots(1, n, figsize=(n * panel_w + 1.2, 5.0 * h / max(w, h) + 0.8),
                             constrained_layout=True, squeeze=False)
    axes = axes[0]
    axes[0].imshow(thumb)
    axes[0].set_title("slide")
    im = None
    for ax, (name, amap) in zip(axes[1:], maps.items()):
        ax.imshow(thumb)
        im = ax.imshow(np.ma.masked_invalid(amap), cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name)
    for ax in axes[: 1 + len(maps)]:
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=list(axes[1: 1 + len(maps)]), fraction=0.046, pad=0.02, label="attention")
    if bars:
        ax = axes[-1]
        labels = [b[0] for b in bars][::-1]
        values = [b[1] for b in bars][::-1]
        colours = ["tab:red" if b[2] else ("tab:blue" if b[0].startswith("stain") else "tab:gray")
                   for b in bars][::-1]
        ax.barh(range(len(bars)), values, color=colours)
        ax.set_yticks(range(len(bars)), labels, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title("stain / slice weights")
    if title:
        fig.suptitle(title)
    return fig
