"""Out-of-focus (blur) QC per tile, and a generated slide with a blurred region to measure it on.

The score is the variance of the Laplacian of the tile's grey image (at the tile's own
magnification, as the grid reads it), over the tile's tissue pixels only (glass has no detail
whether in focus or not), divided by the same at a quarter of the resolution: defocus removes the
fine scales and keeps the coarse one, so the ratio drops (from >= 0.2 on sharp real slides to
<= 0.14 for a defocus of 0.5 to 2 um at 20x), whereas a pale or a dark stain scales both
alike. A tile with too few
tissue pixels is not judged (NaN). Config ``tissue.blur`` turns the veto on and sets its threshold;
docs/benchmarks.md ("Blur QC") has the precision / recall on the generated slide.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

#: Tissue pixels: not white glass (same classes as the artefact veto, slidesnake.tissue).
_WHITE_MAX_S, _WHITE_MIN_V = 30, 200
#: Fewer tissue pixels than this share of the tile: no focus score.
MIN_TISSUE_SHARE = 0.1


def focus_score(tile: np.ndarray) -> float:
    """Normalised variance of the Laplacian over the tissue pixels of an RGB uint8 tile
    (higher = sharper); NaN when under :data:`MIN_TISSUE_SHARE` of it is tissue."""
    rgb = np.ascontiguousarray(tile[..., :3])
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    tissue = ~((hsv[..., 1] < _WHITE_MAX_S) & (hsv[..., 2] > _WHITE_MIN_V))
    # the Laplacian's 3x3 support: judge only pixels whose neighbours are tissue too
    tissue = cv2.erode(tissue.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    if tissue.mean() < MIN_TISSUE_SHARE:
        return math.nan
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    fine = cv2.Laplacian(grey, cv2.CV_32F, ksize=1)
    # the same at a quarter of the resolution: defocus removes the fine scales, the coarse one stays
    quarter = cv2.pyrDown(cv2.pyrDown(grey))
    coarse = cv2.Laplacian(quarter, cv2.CV_32F, ksize=1)
    tissue_q = cv2.resize(tissue.astype(np.uint8), quarter.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
    denom = float(coarse[tissue_q].var()) if tissue_q.any() else 0.0
    if denom < 1.0:  # flat: nothing to be sharp about
        return math.nan
    return float(fine[tissue].var() / denom)


# ---------------------------------------------------------------------------------------------
# a slide with a known blurred region


def blurred_demo_slide(path: str | os.PathLike, width: int = 3072, height: int = 2048, *, seed: int = 3,
                       mpp: float = 0.5, box: tuple[float, float, float, float] = (0.5, 0.0, 1.0, 1.0),
                       sigma_um: float = 2.0) -> tuple[int, int, int, int]:
    """Write a demo H&E slide (slidesnake.demo) whose level-0 rectangle ``box`` (fractions of the
    slide) is out of focus: Gaussian blur of ``sigma_um`` microns, at every pyramid level (sigma
    scaled by the level's downsample). Returns the blurred rectangle in level-0 pixels
    ``(x0, y0, x1, y1)``: the ground truth."""
    from slidesnake.demo import HEScene, write_slide

    scene = HEScene(width, height, seed=seed, mpp=mpp, tissue_fraction=0.6)
    x0, y0, x1, y1 = (int(round(f * s)) for f, s in zip(box, (width, height, width, height)))
    sigma0 = sigma_um / mpp
    pad = int(math.ceil(3 * sigma0))

    def render(x, y, w, h, ds=1.0):
        # render with a margin so the blur near block edges sees real neighbours
        m = int(math.ceil(pad / ds)) + 1
        rgb = scene.render(x - m * ds, y - m * ds, w + 2 * m, h + 2 * m, ds)
        # output pixel centres in level-0 coordinates; blur where they fall in the box
        xs = x + (np.arange(w + 2 * m) - m + 0.5) * ds
        ys = y + (np.arange(h + 2 * m) - m + 0.5) * ds
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        if inside.any():
            blurred = cv2.GaussianBlur(rgb, (0, 0), sigma0 / ds)
            rgb = np.where(inside[..., None], blurred, rgb)
        return np.ascontiguousarray(rgb[m:m + h, m:m + w])

    write_slide(path, width, height, render, mpp=mpp)
    return x0, y0, x1, y1


def precision_recall(tiles, truth: tuple[int, int, int, int], flagged: np.ndarray,
                     min_overlap: float = 0.5) -> dict:
    """Precision and recall of ``flagged`` tiles against the blurred rectangle ``truth``: a tile is
    blurred when at least ``min_overlap`` of its box lies in it. Only tiles with a score count."""
    x0, y0, x1, y1 = truth
    x, y, w, h = (tiles[c].to_numpy(np.float64) for c in ("x", "y", "w", "h"))
    ox = np.clip(np.minimum(x + w, x1) - np.maximum(x, x0), 0, None)
    oy = np.clip(np.minimum(y + h, y1) - np.maximum(y, y0), 0, None)
    positive = ox * oy / (w * h) >= min_overlap
    flagged = np.asarray(flagged, bool)
    tp, fp, fn = int((flagged & positive).sum()), int((flagged & ~positive).sum()), int((~flagged & positive).sum())
    return {"tiles": len(tiles), "blurred": int(positive.sum()), "flagged": int(flagged.sum()), "tp": tp,
            "fp": fp, "fn": fn, "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan")}
