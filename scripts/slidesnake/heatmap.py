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
