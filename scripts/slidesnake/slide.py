"""Opening slides and resolving their physical resolution.

The base microns-per-pixel (MPP) and objective power of a slide are never assumed: they are read
from the slide (or the sample sheet's ``mpp`` override), and where each value came from is recorded.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import openslide

# 10 / MPP is the conventional magnification of a pixel size (0.25 um/px ~ 40x, 0.5 um/px ~ 20x).
MPP_AT_1X = 10.0
# Plausible range of a slide's level-0 pixel size in microns; values outside are metadata junk
# (e.g. a 72-dpi default resolution tag).
MPP_RANGE = (0.05, 20.0)


class SlideError(Exception):
    """A problem with one slide. ``str(err)`` is a single line naming the slide and the fix."""

    def __init__(self, slide_id: str, path: str | os.PathLike, problem: str, fix: str):
        self.slide_id, self.path, self.problem, self.fix = slide_id, str(path), problem, fix
        super().__init__(f"slide {slide_id!r} ({path}): {problem}; {fix}")


def open_slide(path: str | os.PathLike, slide_id: str) -> openslide.AbstractSlide:
    """Open a slide with OpenSlide (falling back to PIL for plain images), with clear errors."""
    path = Path(path)
    if not path.exists():
        raise SlideError(slide_id, path, "file not found", "fix the 'path' column of the sample sheet")
    if path.stat().st_size == 0:
        raise SlideError(slide_id, path, "file is empty (0 bytes)", "re-copy the slide from its source")
    try:
        return openslide.open_slide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        raise SlideError(
            slide_id, path, f"cannot be opened ({msg})",
            "check that the file is a complete whole-slide image in a format OpenSlide reads",
        ) from None


@dataclass(frozen=True)
class Resolution:
    mpp: float
    mpp_source: str
    objective_power: float
    objective_source: str

    def to_dict(self) -> dict:
        return asdict(self)


def _float(props, key) -> float | None:
    try:
        v = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _tiff_mpp(props) -> float | None:
    res, unit = _float(props, "tiff.XResolution"), props.get("tiff.ResolutionUnit")
    if res is None or unit not in ("centimeter", "inch"):
        return None
    return (1e4 if unit == "centimeter" else 25400.0) / res


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def resolve_resolution(
    props,
    slide_id: str,
    path: str | os.PathLike = "",
    *,
    mpp_override: float | None = None,
    default_mpp: float | None = None,
    default_objective: float | None = None,
) -> Resolution:
    """Base MPP and objective power of a slide, each with the source it came from.

    MPP, in order: the sheet's ``mpp`` override; ``openslide.mpp-x``; TIFF resolution tags with their
    unit; ``aperio.MPP``; derived from the objective power (10 / objective); the config default.
    Objective power: ``openslide.objective-power``; ``aperio.AppMag``; ``hamamatsu.SourceLens``;
    derived from the MPP (10 / MPP); the config default.
    """
    mpp_candidates = [
        ("sample sheet mpp column", mpp_override if mpp_override and mpp_override > 0 else None),
        ("openslide.mpp-x", _float(props, openslide.PROPERTY_NAME_MPP_X)),
        ("tiff resolution tags", _tiff_mpp(props)),
        ("aperio.MPP", _float(props, "aperio.MPP")),
    ]
    obj_candidates = [
        ("openslide.objective-power", _float(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
        ("aperio.AppMag", _float(props, "aperio.AppMag")),
        ("hamamatsu.SourceLens", _float(props, "hamamatsu.SourceLens")),
    ]
    mpp = next(((s, v) for s, v in mpp_candidates if _plausible(v)), None)
    obj = next(((s, v) for s, v in obj_candidates if v), None)
    if mpp is None and obj is None:
        if default_mpp:
            mpp = ("config tiling.default_mpp", float(default_mpp))
        if default_objective:
            obj = ("config tiling.default_objective", float(default_objective))
    if mpp is None and obj is None:
        raise SlideError(
            slide_id, path, "no microns-per-pixel or objective power in the slide's metadata",
            "put the level-0 microns per pixel in the sample sheet's 'mpp' column",
        )
    if mpp is None:
        mpp = ("derived from objective power (10 / objective)", MPP_AT_1X / obj[1])
    if obj is None:
        obj = ("derived from mpp (10 / mpp)", MPP_AT_1X / mpp[1])
    return Resolution(mpp=mpp[1], mpp_source=mpp[0], objective_power=obj[1], objective_source=obj[0])
