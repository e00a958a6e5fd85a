"""Opening slides and resolving their physical resolution.

The base microns-per-pixel (MPP) and objective power of a slide are never assumed: they are read
from the slide (or the sample sheet's ``mpp`` override), and where each value came from is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import openslide

from slidesnake.errors import SlideError, one_line_errors  # noqa: F401  (one_line_errors: imported from here by scripts)
from slidesnake.geometry import MPP_AT_1X  # noqa: F401  (also imported from here)

_log = logging.getLogger(__name__)

# Plausible range of a slide's level-0 pixel size in microns; values outside are metadata junk
# (e.g. a 72-dpi default resolution tag).
MPP_RANGE = (0.05, 20.0)


def open_slide(path: str | os.PathLike, slide_id: str, reader: str = "auto") -> openslide.AbstractSlide:
    """Open a slide through the reader layer (:mod:`slidesnake.readers`: OpenSlide, then wsidicom for
    DICOM-WSI, tiffslide for OME-TIFF and plain TIFF, PIL for plain images), with one-line errors.

    ``path`` is a file, or a folder of DICOM-WSI instances. The reader used is
    :func:`slidesnake.readers.reader_of` of the result; its warnings (e.g. a DICOM instance without
    ImageType) are logged naming the slide.
    """
    from slidesnake.readers import ReaderError, open_any

    path = Path(path)
    if not path.exists():
        raise SlideError(slide_id, path, "file not found", "fix the 'path' column of the sample sheet")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(slide_id, path, "file is empty (0 bytes)", "re-copy the slide from its source")
    # A cut-off copy of a TIFF-based slide may still open (OpenSlide reads the header, or PIL reads
    # its first image) and fail only later, or be misread: say what is wrong before anything else.
    if path.is_file() and (truncated := tiff_truncation(path)):
        raise SlideError(slide_id, path, f"file is truncated ({truncated})",
                         "re-copy the slide from its source (the copy is incomplete)")
    try:
        return open_any(path, reader, warn=lambda msg: _log.warning("slide %r (%s): %s", slide_id, path, msg))
    except ReaderError as err:
        raise SlideError(slide_id, path, err.problem, err.fix) from None
    except (openslide.OpenSlideError, OSError, ValueError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        raise SlideError(
            slide_id, path, f"cannot be opened ({msg})",
            "check that the file is a complete whole-slide image (OpenSlide formats, DICOM-WSI, OME-TIFF, "
            "TIFF, PNG/JPEG)",
        ) from None


_TIFF_ARRAYS = {273: 279, 324: 325}  # StripOffsets -> StripByteCounts, TileOffsets -> TileByteCounts
_TIFF_INTS = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8


class _Truncated(Exception):
    pass


def tiff_truncation(path: str | os.PathLike) -> str | None:
    """Where a TIFF-based file (SVS, generic tiled TIFF, BigTIFF, ...) ends before its own structure
    does, e.g. ``"301370 bytes, but IFD 3 starts at byte 316548"``; None when the structure fits
    in the file, or when the file is no TIFF (or one this check cannot judge: classic TIFFs over
    4 GiB, such as large NDPI files, keep offsets outside the TIFF fields)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            if head[:2] not in (b"II", b"MM") or len(head) < 8:
                return None
            e = "<" if head[:2] == b"II" else ">"
            magic = struct.unpack(e + "H", head[2:4])[0]
            if magic == 42 and size <= 2**32:
                big, ifd = False, struct.unpack(e + "I", head[4:8])[0]
            elif magic == 43 and len(head) == 16:
                big, ifd = True, struct.unpack(e + "Q", head[8:16])[0]
            else:
                return None
            seen: set[int] = set()
            while ifd and ifd not in seen and len(seen) < 100_000:
                seen.add(ifd)
                ifd = _check_ifd(fh, e, big, ifd, size, f"IFD {len(seen)}")
    except _Truncated as err:
        return str(err)
    except (OSError, struct.error, KeyError):
        return None  # malformed in some other way: OpenSlide says what
    return None


def _check_ifd(fh, e: str, big: bool, ifd: int, size: int, where: str) -> int:
    """Check that one IFD and its strips / tiles lie inside the file; return the next IFD's offset."""
    count_fmt, entry, ptr, inline = (e + "Q", 20, e + "Q", 8) if big else (e + "H", 12, e + "I", 4)
    if ifd + struct.calcsize(count_fmt) > size:
        raise _Truncated(f"{size} bytes, but {where} starts at byte {ifd}")
    fh.seek(ifd)
    n = struct.unpack(count_fmt, fh.read(struct.calcsize(count_fmt)))[0]
    end = ifd + struct.calcsize(count_fmt) + n * entry + struct.calcsize(ptr)
    if end > size:
        raise _Truncated(f"{size} bytes, but {where} ends at byte {end}")
    raw = fh.read(n * entry + struct.calcsize(ptr))
    fields = {}
    for k in range(n):
        item = raw[k * entry:(k + 1) * entry]
        tag, typ, count = struct.unpack(e + "HH" + ("Q" if big else "I"), item[:entry - inline])
        fields[tag] = (typ, count, item[entry - inline:])

    def values(tag: int) -> tuple[int, ...]:
        typ, count, value = fields[tag]
        fmt = e + _TIFF_INTS[typ] * count
        nbytes = struct.calcsize(fmt)
        if nbytes <= inline:
            return struct.unpack(fmt, value[:nbytes])
        at = struct.unpack(ptr, value)[0]
        if at + nbytes > size:
            raise _Truncated(f"{size} bytes, but the data offsets of {where} end at byte {at + nbytes}")
        fh.seek(at)
        return struct.unpack(fmt, fh.read(nbytes))

    for offsets, counts in _TIFF_ARRAYS.items():
        if {offsets, counts} <= set(fields) and {fields[offsets][0], fields[counts][0]} <= set(_TIFF_INTS):
            data_end = max((o + c for o, c in zip(values(offsets), values(counts))), default=0)
            if data_end > size:
                raise _Truncated(f"{size} bytes, but the image data of {where} end at byte {data_end}")
    return struct.unpack(ptr, raw[n * entry:])[0]


@dataclass(frozen=True)
class Resolution:
    """Level-0 pixel size and objective power of a slide, each with where it came from.

    ``mpp`` is the x pixel size (what tiling uses); ``mpp_y`` is the y pixel size, equal to ``mpp``
    unless the slide says otherwise (a y-only value is never used: both come from one source).
    """

    mpp: float
    mpp_source: str
    objective_power: float
    objective_source: str
    mpp_y: float | None = None

    def __post_init__(self):
        if self.mpp_y is None:
            object.__setattr__(self, "mpp_y", self.mpp)

    @property
    def anisotropy(self) -> float:
        """Relative difference of the y and x pixel sizes (0 for square pixels)."""
        return abs(self.mpp_y - self.mpp) / self.mpp

    def to_dict(self) -> dict:
        return asdict(self)


def _float(props, key) -> float | None:
    try:
        v = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _pair(x: float | None, y: float | None) -> tuple[float, float] | None:
    """An (x, y) pixel size from one source; y defaults to x, a y without an x is not enough."""
    return None if x is None else (x, y if y is not None else x)


def _tiff_mpp(props) -> tuple[float, float] | None:
    unit = props.get("tiff.ResolutionUnit")
    if unit not in ("centimeter", "inch"):
        return None
    um_per_unit = 1e4 if unit == "centimeter" else 25400.0
    x, y = _float(props, "tiff.XResolution"), _float(props, "tiff.YResolution")
    return _pair(um_per_unit / x if x else None, um_per_unit / y if y else None)


def _hamamatsu_mpp(props) -> tuple[float, float] | None:
    """Hamamatsu VMS/VMU: PhysicalWidth/Height (nanometres) over the level-0 size in pixels."""
    w, h = _float(props, "openslide.level[0].width"), _float(props, "openslide.level[0].height")
    pw, ph = _float(props, "hamamatsu.PhysicalWidth"), _float(props, "hamamatsu.PhysicalHeight")
    return _pair(pw / 1000 / w if pw and w else None, ph / 1000 / h if ph and h else None)


def _plausible(mpp: tuple[float, float] | None) -> bool:
    return mpp is not None and all(MPP_RANGE[0] <= v <= MPP_RANGE[1] for v in mpp)


def resolve_resolution(
    props,
    slide_id: str,
    path: str | os.PathLike = "",
    *,
    mpp_override: float | None = None,
    default_mpp: float | None = None,
    default_objective: float | None = None,
) -> Resolution:
    """Base MPP (x and y) and objective power of a slide, each with the source it came from.

    MPP, first plausible of: the sheet's ``mpp`` override; ``openslide.mpp-x`` (and ``-y``); the
    reader layer's DICOM PixelSpacing and OME ``PhysicalSizeX``/``Y`` (unit converted); TIFF
    resolution tags with their unit; vendor properties (``aperio.MPP``; Hamamatsu VMS
    ``PhysicalWidth``/``PhysicalHeight`` over the level-0 size; tiffslide's); derived from the
    objective power (10 / objective). Objective power: ``openslide.objective-power``;
    ``aperio.AppMag``; ``hamamatsu.SourceLens``; DICOM ObjectiveLensPower; OME NominalMagnification;
    tiffslide's; derived from the MPP (10 / MPP). The config defaults are used only when the slide
    has neither (and no override). Implausible MPPs (outside ``MPP_RANGE``, e.g. a 72-dpi default
    resolution tag) are skipped.
    """
    override = float(mpp_override) if mpp_override and mpp_override > 0 else None
    mpp_candidates = [
        ("sample sheet mpp column", _pair(override, None)),
        ("openslide.mpp-x", _pair(_float(props, openslide.PROPERTY_NAME_MPP_X),
                                    _float(props, openslide.PROPERTY_NAME_MPP_Y))),
        # reader layer (slidesnake.readers): DICOM PixelSpacing, OME PhysicalSizeX/Y with its unit
        # (ahead of the TIFF tags an OME-TIFF also carries), tiffslide's vendor parsers
        ("DICOM PixelSpacing (wsidicom)", _pair(_float(props, "dicom.mpp-x"), _float(props, "dicom.mpp-y"))),
        ("OME PhysicalSizeX/Y", _pair(_float(props, "ome.mpp-x"), _float(props, "ome.mpp-y"))),
        ("tiff resolution tags", _tiff_mpp(props)),
        ("aperio.MPP", _pair(_float(props, "aperio.MPP"), None)),
        ("hamamatsu.PhysicalWidth/Height", _hamamatsu_mpp(props)),
        ("tiffslide.mpp-x", _pair(_float(props, "tiffslide.mpp-x"), _float(props, "tiffslide.mpp-y"))),
    ]
    obj_candidates = [
        ("openslide.objective-power", _float(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
        ("aperio.AppMag", _float(props, "aperio.AppMag")),
        ("hamamatsu.SourceLens", _float(props, "hamamatsu.SourceLens")),
        ("DICOM ObjectiveLensPower (wsidicom)", _float(props, "dicom.ObjectiveLensPower")),
        ("OME Objective NominalMagnification", _float(props, "ome.NominalMagnification")),
        ("tiffslide.objective-power", _float(props, "tiffslide.objective-power")),
    ]
    mpp = next(((s, v) for s, v in mpp_candidates if _plausible(v)), None)
    obj = next(((s, v) for s, v in obj_candidates if v), None)
    if mpp is None and obj is None:
        if default_mpp:
            mpp = ("config tiling.default_mpp", (float(default_mpp),) * 2)
        if default_objective:
            obj = ("config tiling.default_objective", float(default_objective))
    if mpp is None and obj is None:
        raise SlideError(
            slide_id, path, "no microns-per-pixel or objective power in the slide's metadata",
            "put the level-0 microns per pixel in the sample sheet's 'mpp' column",
        )
    if mpp is None:
        mpp = ("derived from objective power (10 / objective)", (MPP_AT_1X / obj[1],) * 2)
    if obj is None:
        obj = ("derived from mpp (10 / mpp)", MPP_AT_1X / mpp[1][0])
    return Resolution(mpp=mpp[1][0], mpp_source=mpp[0], objective_power=obj[1], objective_source=obj[0],
                      mpp_y=mpp[1][1])


def check_readable(slide: openslide.AbstractSlide, slide_id: str, path: str | os.PathLike) -> None:
    """Decode one small region at the lowest and at the highest resolution, or raise SlideError.

    Catches files whose header opens but whose pixel data is damaged before any tiling work.
    """
    plain_image = isinstance(slide, openslide.ImageSlide)
    for level in sorted({slide.level_count - 1, 0}):
        w, h = slide.level_dimensions[level]
        ds = slide.level_downsamples[level]
        size = (min(w, 64), min(h, 64))
        loc = (int((w - size[0]) // 2 * ds), int((h - size[1]) // 2 * ds))
        with pixel_errors(slide_id, path, plain_image=plain_image):
            slide.read_region(loc, level, size)


@contextlib.contextmanager
def pixel_errors(slide_id: str, path: str | os.PathLike, plain_image: bool = False) -> Iterator[None]:
    """Turn OpenSlide's (or, for plain images, PIL's) errors while decoding pixels into a SlideError."""
    try:
        yield
    except (openslide.OpenSlideError, OSError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        if plain_image:
            problem = f"not a whole-slide format OpenSlide reads, and PIL cannot decode it either ({msg})"
            fix = "convert it to a pyramidal TIFF (e.g. bfconvert -pyramid-resolutions, or vips tiffsave --pyramid)"
        else:
            problem = f"pixel data cannot be read ({msg})"
            fix = "the file is damaged: re-copy or re-export it from the scanner"
        raise SlideError(slide_id, path, problem, fix) from None
