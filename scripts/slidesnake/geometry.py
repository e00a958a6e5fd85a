"""Magnification names and targets, tile-box geometry: pure NumPy, no slide reader.

Shared by tiling (which builds the grids), the feature store and the bags (which link tiles across
magnifications), so the training environment needs no OpenSlide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# 10 / MPP is the conventional magnification of a pixel size (0.25 um/px ~ 40x, 0.5 um/px ~ 20x).
MPP_AT_1X = 10.0


def mag_label(magnification: float) -> str:
    """``20.0`` -> ``"20x"``: how directories, columns and store groups name a magnification."""
    return f"{float(magnification):g}x"


def parent_indices(fine_xy: np.ndarray, fine_wh: np.ndarray, coarse_xy: np.ndarray,
                   coarse_wh: np.ndarray) -> np.ndarray:
    """For each fine tile, the row of the coarse tile that contains its centre (-1 if none).

    All boxes are level-0 (x, y, w, h). Coarse tiles of one grid do not overlap (overlap 0) or
    overlap by a margin; the first containing row wins. A coarse grid of equal boxes on a regular
    lattice (every grid that :func:`build_grid` makes) is looked up in one vectorised step; other
    boxes fall back to a sweep over candidates sorted by x.
    """
    fine_xy, fine_wh = np.asarray(fine_xy, np.int64), np.asarray(fine_wh, np.int64)
    coarse_xy, coarse_wh = np.asarray(coarse_xy, np.int64), np.asarray(coarse_wh, np.int64)
    out = np.full(len(fine_xy), -1, dtype=np.int64)
    if len(fine_xy) == 0 or len(coarse_xy) == 0:
        return out
    centre = fine_xy * 2 + fine_wh  # doubled, to stay in integers
    lattice = _lattice_lookup(centre, coarse_xy, coarse_wh)
    if lattice is not None:
        return lattice
    lo, hi = coarse_xy * 2, (coarse_xy + coarse_wh) * 2
    # Sort coarse tiles by x so each fine centre only checks candidates whose x-range covers it.
    order = np.argsort(lo[:, 0], kind="stable")
    lo_sorted = lo[order, 0]
    width = int((hi[:, 0] - lo[:, 0]).max())
    start = np.searchsorted(lo_sorted, centre[:, 0] - width, side="left")
    stop = np.searchsorted(lo_sorted, centre[:, 0], side="right")
    for i in range(len(fine_xy)):
        cand = order[start[i]:stop[i]]
        inside = ((lo[cand, 0] <= centre[i, 0]) & (centre[i, 0] < hi[cand, 0])
                  & (lo[cand, 1] <= centre[i, 1]) & (centre[i, 1] < hi[cand, 1]))
        hit = cand[inside]
        if len(hit):
            out[i] = hit.min()
    return out


def _lattice_lookup(centre2: np.ndarray, coarse_xy: np.ndarray, coarse_wh: np.ndarray) -> np.ndarray | None:
    """Parent rows via lattice arithmetic when the coarse boxes tile a regular lattice; else None.

    ``centre2`` holds doubled fine centres. Requires equal boxes, origins on the lattice spanned by
    the box size, and no two boxes at one lattice position.
    """
    w, h = coarse_wh[0]
    if w <= 0 or h <= 0 or (coarse_wh != (w, h)).any():
        return None
    x0, y0 = coarse_xy.min(axis=0)
    dx, dy = coarse_xy[:, 0] - x0, coarse_xy[:, 1] - y0
    if (dx % w).any() or (dy % h).any():
        return None
    ci, ri = dx // w, dy // h
    ncol, nrow = int(ci.max()) + 1, int(ri.max()) + 1
    table = np.full((nrow, ncol), -1, np.int64)
    table[ri, ci] = np.arange(len(coarse_xy))
    if (table >= 0).sum() != len(coarse_xy):  # duplicates: let the sweep decide ties
        return None
    fc = (centre2[:, 0] - 2 * x0) // (2 * w)
    fr = (centre2[:, 1] - 2 * y0) // (2 * h)
    inside = (fc >= 0) & (fc < ncol) & (fr >= 0) & (fr < nrow)
    out = np.full(len(centre2), -1, np.int64)
    out[inside] = table[fr[inside], fc[inside]]
    return out


@dataclass(frozen=True)
class Target:
    """One entry of ``tiling.magnifications``: a magnification (``20``, ``"20x"``) or a pixel size
    (``"0.5um"``).

    A magnification is relative to the slide's objective power; a pixel size is absolute (downsample
    = target / slide MPP), so tiles have the same size in microns on every scanner. Either way the
    grid, the feature store and ``training.magnification`` name it by ``magnification``, for a pixel
    size its nominal magnification 10 / mpp (0.5 um/px -> 20x).
    """

    magnification: float
    mpp: float | None = None

    @property
    def name(self) -> str:
        return f"{self.mpp:g}um" if self.mpp else f"{self.magnification:g}x"

    def downsample(self, resolution) -> float:
        """Level-0 pixels per output pixel on a slide of ``resolution`` (a slidesnake.slide.Resolution)."""
        if self.mpp:
            return self.mpp / resolution.mpp
        return resolution.objective_power / self.magnification


_TARGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(x|X|um|µm|μm)\s*$")


def parse_target(entry) -> Target:
    """``20``, ``"20x"`` -> 20x; ``"0.5um"`` (or ``"0.5 µm"``) -> 0.5 um/px, labelled 20x."""
    if isinstance(entry, Target):
        return entry
    if isinstance(entry, (int, float)) and not isinstance(entry, bool) and entry > 0:
        return Target(float(entry))
    m = _TARGET.match(str(entry))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"tiling.magnifications entry {entry!r} is neither a magnification "
                         "(20 or '20x') nor a pixel size in microns ('0.5um')")
    value = float(m.group(1))
    return Target(value) if m.group(2) in "xX" else Target(MPP_AT_1X / value, mpp=value)


def parse_targets(entries) -> list[Target]:
    """Parse ``tiling.magnifications``; two entries naming the same magnification are an error."""
    targets = [parse_target(e) for e in entries]
    seen: dict[str, Target] = {}
    for t in targets:
        key = f"{t.magnification:g}"
        if key in seen:
            raise ValueError(f"tiling.magnifications: {seen[key].name} and {t.name} both name "
                             f"magnification {key}x; keep one")
        seen[key] = t
    return targets
