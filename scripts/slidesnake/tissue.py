"""Tissue filtering: slide-level tissue masks, per-tile scores, keep flags and QC outputs.

Methods (config ``tissue``, see docs/design.md "Tissue table"):

* ``edge`` -- CMA-MIL's edge density of each tile (PIL ``FIND_EDGES``), read at the tile's own
  magnification; tissue when above ``edge_threshold``.
* ``otsu`` -- a slide-level mask: Otsu threshold of the HSV saturation of a low-resolution
  overview (read block by block in bounded memory), morphological closing, small objects removed
  and small holes filled; a tile is tissue when the mask covers at least ``otsu.min_coverage`` of it.
* artefact rejection (``artefacts``) -- a veto on top of the combined methods: tiles that are
  mostly background (white glass or black) or carry pen ink (green, blue, black) are rejected.

Nothing is ever held at full resolution: the mask and QC thumbnail come from a low level, tile
scores from tiles read one by one in worker processes.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import openslide
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from slidesnake.focus import focus_score
from slidesnake.slide import pixel_errors
from slidesnake.tiling import TileReader, mag_label, map_tiles

log = logging.getLogger(__name__)

METHODS = ("edge", "otsu")
MODALITIES = ("brightfield", "fluorescence")
#: Sheet ``stain`` values (lower case, any of these words) that mean a fluorescence image.
FLUORESCENCE_STAINS = ("dapi", "hoechst", "fitc", "tritc", "cy2", "cy3", "cy5", "cy7", "gfp", "rfp", "if",
                       "mif", "fluorescence", "fluorescent", "immunofluorescence", "opal", "af488", "af555",
                       "af594", "af647", "alexa")
#: An overview whose median brightest-channel value is below this is a dark-background
#: (fluorescence) image: brightfield glass is bright (~240), even full-tissue fields stay above 150.
FLUORESCENCE_MAX_MEDIAN = 80
SCORE_COLUMNS = ["edge_score", "tissue_fraction", "background_fraction", "ink_fraction", "focus_score"]
FLAG_COLUMNS = ["tissue", "artefact", "blurred", "keep"]

# Pixel classes of artefact rejection, in OpenCV's 8-bit HSV (H in [0, 180), S and V in [0, 255]).
# Measured on the real slides in ../shared (CMU-1 H&E, a TCGA frozen section, Ki67 and kidney IHC,
# an NDPI H&E crop): tissue tiles have at most ~4% of their pixels in any ink class.
#: White glass: unsaturated and bright.
WHITE_MAX_S, WHITE_MIN_V = 30, 200
#: Black background (unscanned or out-of-focus black areas): very dark.
BLACK_MAX_V = 25
#: Green ink: hues from yellow-green to cyan (70-190 deg), clearly saturated. H&E and DAB never are.
GREEN_H, GREEN_MIN_S, GREEN_MIN_V = (35, 95), 60, 30
#: Blue ink: pure blues (200-244 deg), strongly saturated. Haematoxylin is purple (H&E, >= 240 deg)
#: or much less saturated (IHC counterstain, S mostly < 160).
BLUE_H, BLUE_MIN_S, BLUE_MIN_V = (100, 122), 160, 40
#: Black ink: dark, not strongly saturated, and not brown/red (dark DAB-positive nuclei are).
#: Very dark pixels (``BLACK_MAX_V``) count as ink too: over tissue they are ink, not glass.
BLACK_INK_V, BLACK_INK_MAX_S = (BLACK_MAX_V, 50), 130
BROWN_H, BROWN_MIN_S = (30, 170), 60  # hues outside [30, 170) with S >= 60 are brown/red

CLASSIFICATION = {"name": "Tissue", "color": [0, 150, 0]}


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class OtsuParams:
    min_coverage: float = 0.25     # tile is tissue when the mask covers at least this fraction
    mask_mpp: float = 8.0          # microns per mask pixel
    min_threshold: float = 15.0    # clamp of the Otsu threshold on saturation (0-255) ...
    max_threshold: float = 30.0    # ... so blank and all-tissue slides stay sane
    closing_um: float = 50.0       # diameter of the closing disk
    min_area_mm2: float = 0.01     # smaller tissue components are dropped
    max_hole_mm2: float = 0.01     # smaller holes are filled
    # brightfield: a pixel is also tissue when its optical density (sum over RGB of -ln(I / 256))
    # exceeds this (0: off); catches pale, unsaturated haematoxylin (IHC counterstain) that
    # saturation misses
    od_threshold: float = 0.5
    # fluorescence: Otsu's threshold on the brightest channel (0-255) is clamped to this range
    fluorescence_min_threshold: float = 20.0
    fluorescence_max_threshold: float = 100.0
    # fluorescence: closing disk diameter (um); larger than brightfield's, as a nuclear stain
    # lights nuclei, not the stroma between them
    fluorescence_closing_um: float = 150.0


@dataclass(frozen=True)
class ArtefactParams:
    enabled: bool = True
    max_background: float = 0.8    # reject tiles whose white-or-black fraction exceeds this
    max_ink: float = 0.1           # reject tiles whose pen-ink fraction exceeds this


@dataclass(frozen=True)
class BlurParams:
    enabled: bool = True
    min_focus: float = 0.15        # reject tissue tiles whose focus score (slidesnake.focus) is below


@dataclass(frozen=True)
class TissueParams:
    methods: tuple[str, ...] = ("edge", "otsu")
    combine: str = "any"
    edge_threshold: float = 15.0
    otsu: OtsuParams = field(default_factory=OtsuParams)
    artefacts: ArtefactParams = field(default_factory=ArtefactParams)
    blur: BlurParams = field(default_factory=BlurParams)
    # brightfield, fluorescence, or auto (the sheet's stain, the slide's metadata, else the image:
    # see resolve_modality)
    modality: str = "auto"

    def __post_init__(self):
        if self.modality not in MODALITIES + ("auto",):
            raise ValueError(f"tissue.modality must be auto or one of {MODALITIES}, got {self.modality!r}")
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"tissue.methods must be a non-empty subset of {METHODS}, got {list(self.methods)}")
        if self.combine not in ("all", "any"):
            raise ValueError(f"tissue.combine must be 'all' or 'any', got {self.combine!r}")

    @classmethod
    def from_config(cls, cfg: dict) -> "TissueParams":
        """From the config's ``tissue`` section (keys not given keep their defaults)."""
        return cls(
            methods=tuple(cfg.get("methods", cls.methods)),
            combine=cfg.get("combine", cls.combine),
            edge_threshold=float(cfg.get("edge_threshold", cls.edge_threshold)),
            otsu=OtsuParams(**(cfg.get("otsu") or {})),
            artefacts=ArtefactParams(**(cfg.get("artefacts") or {})),
            blur=BlurParams(**(cfg.get("blur") or {})),
            modality=cfg.get("modality", cls.modality),
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# per-tile scores


def edge_density(tile: np.ndarray) -> float:
    """CMA-MIL's edge density: mean over RGB of the summed ``FIND_EDGES`` response per pixel.

    Blank glass scores near 0, tissue well above the default threshold of 15.
    """
    edges = np.asarray(Image.fromarray(tile).filter(ImageFilter.FIND_EDGES), dtype=np.float64)
    return float(edges.sum(axis=(0, 1)).mean() / (tile.shape[0] * tile.shape[1]))


def pixel_classes(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of background (white, black) and ink (green, blue, black) pixels of an RGB image."""
    h, s, v = cv2.split(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV))
    return {
        "white": (s < WHITE_MAX_S) & (v > WHITE_MIN_V),
        "black": v < BLACK_MAX_V,
        "green_ink": (h >= GREEN_H[0]) & (h < GREEN_H[1]) & (s >= GREEN_MIN_S) & (v >= GREEN_MIN_V),
        "blue_ink": (h >= BLUE_H[0]) & (h < BLUE_H[1]) & (s >= BLUE_MIN_S) & (v >= BLUE_MIN_V),
        "black_ink": ((v >= BLACK_INK_V[0]) & (v < BLACK_INK_V[1]) & (s < BLACK_INK_MAX_S)
                      & (((h >= BROWN_H[0]) & (h < BROWN_H[1])) | (s < BROWN_MIN_S))),
    }


def artefact_fractions(tile: np.ndarray) -> tuple[float, float]:
    """``(background_fraction, ink_fraction)`` of a tile.

    Background: white glass or black pixels. Ink: green, blue or black ink, or black pixels.
    """
    c = pixel_classes(tile)
    background = c["white"] | c["black"]
    ink = c["green_ink"] | c["blue_ink"] | c["black_ink"] | c["black"]
    return float(background.mean()), float(ink.mean())


def score_tile(reader: TileReader, address, *, edge: bool = True, artefacts: bool = True,
               focus: bool = False) -> tuple:
    """``(edge_score, background_fraction, ink_fraction, focus_score)`` of one tile (NaN where not
    asked)."""
    tile = reader.read(*address)
    e = edge_density(tile) if edge else math.nan
    bg, ink = artefact_fractions(tile) if artefacts else (math.nan, math.nan)
    return e, bg, ink, focus_score(tile) if focus else math.nan


# ---------------------------------------------------------------------------------------------
# low-resolution overview and tissue mask


@dataclass
class Overview:
    """A low-resolution RGB image of the whole slide; pixel (i, j) covers level-0
    ``[j * sx, (j + 1) * sx) x [i * sy, (i + 1) * sy)``."""

    rgb: np.ndarray
    sx: float
    sy: float


def thumbnail(slide: openslide.AbstractSlide, max_size: int, *, slide_id: str = "?",
              path: str = "") -> Image.Image:
    """The whole slide as an RGB image whose longer side is ``max_size`` pixels, read block by block
    (:func:`read_overview`): unlike ``slide.get_thumbnail``, which reads the whole best level at once,
    memory stays bounded on slides without a pyramid."""
    w, h = slide.dimensions
    return Image.fromarray(read_overview(slide, max(w, h) / max(1, int(max_size)), slide_id=slide_id,
                                         path=path).rgb)


def read_overview(slide: openslide.AbstractSlide, downsample: float, *, block: int = 2048,
                  slide_id: str = "?", path: str = "") -> Overview:
    """The slide at ``downsample`` (level-0 pixels per pixel), read in blocks of at most
    ``block`` x ``block`` pixels of the pyramid level read, so memory stays bounded whatever the
    slide's size and pyramid. Transparent areas become the slide's background colour.
    """
    W, H = slide.dimensions
    downsample = max(1.0, float(downsample))
    ow, oh = max(1, round(W / downsample)), max(1, round(H / downsample))
    sx, sy = W / ow, H / oh
    level = slide.get_best_level_for_downsample(min(sx, sy))
    dl = float(slide.level_downsamples[level])
    lw, lh = slide.level_dimensions[level]
    bg = np.array(Image.new("RGB", (1, 1), "#" + slide.properties.get(
        openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")).getpixel((0, 0)), np.uint16)
    out = np.empty((oh, ow, 3), np.uint8)
    ob = max(1, int(block * dl / max(sx, sy)))  # output pixels per block side
    plain = isinstance(slide, openslide.ImageSlide)
    for oy0 in range(0, oh, ob):
        for ox0 in range(0, ow, ob):
            ox1, oy1 = min(ow, ox0 + ob), min(oh, oy0 + ob)
            lx0, ly0 = int(ox0 * sx / dl), int(oy0 * sy / dl)
            lx1, ly1 = min(lw, math.ceil(ox1 * sx / dl)), min(lh, math.ceil(oy1 * sy / dl))
            with pixel_errors(slide_id, path, plain_image=plain):
                region = slide.read_region((round(lx0 * dl), round(ly0 * dl)), level,
                                           (max(1, lx1 - lx0), max(1, ly1 - ly0)))
            rgba = np.asarray(region, dtype=np.uint16)
            alpha = rgba[..., 3:4]
            rgb = ((rgba[..., :3] * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)
            out[oy0:oy1, ox0:ox1] = cv2.resize(rgb, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
    return Overview(out, sx, sy)


@dataclass
class TissueMask:
    """Binary tissue mask over the whole slide (see :class:`Overview` for its geometry)."""

    mask: np.ndarray
    sx: float
    sy: float
    threshold: float   # threshold used (Otsu's, clamped): saturation, or brightness (fluorescence)
    otsu: float        # Otsu's own threshold
    mpp: float         # level-0 microns per pixel of the slide
    modality: str = "brightfield"

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum() * self.sx * self.sy * self.mpp ** 2 / 1e6)

    def coverage(self, tiles: pd.DataFrame) -> np.ndarray:
        """Fraction of each tile's level-0 box (x, y, w, h) covered by the mask."""
        integral = cv2.integral(self.mask.astype(np.uint8), sdepth=cv2.CV_32S)
        mh, mw = self.mask.shape

        def edges(lo, size, scale, limit):
            a = np.clip(np.round(lo / scale).astype(np.int64), 0, limit)
            b = np.clip(np.round((lo + size) / scale).astype(np.int64), 0, limit)
            return a, np.maximum(b, np.minimum(a + 1, limit))

        x0, x1 = edges(tiles["x"].to_numpy(), tiles["w"].to_numpy(), self.sx, mw)
        y0, y1 = edges(tiles["y"].to_numpy(), tiles["h"].to_numpy(), self.sy, mh)
        total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        return (total / area).astype(np.float32)


def _disk(diameter_px: float) -> np.ndarray:
    d = max(1, int(round(diameter_px)) | 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """``mask`` without 8-connected components smaller than ``min_px`` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def _fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """``mask`` with holes (background components not touching the border) under ``max_px`` filled."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    h, w = mask.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    touches = (x == 0) | (y == 0) | (x + stats[:, cv2.CC_STAT_WIDTH] == w) | (y + stats[:, cv2.CC_STAT_HEIGHT] == h)
    fill = (stats[:, cv2.CC_STAT_AREA] < max_px) & ~touches
    fill[0] = False  # label 0 is the mask itself
    return mask | fill[labels]


def tissue_mask(overview: Overview, mpp: float, params: OtsuParams = OtsuParams(),
                modality: str = "brightfield") -> TissueMask:
    """Tissue mask of an overview, then closing, small objects dropped, small holes filled.

    Brightfield: Otsu threshold of the median-blurred HSV saturation (clamped to
    ``[min_threshold, max_threshold]``), or optical density above ``od_threshold`` (pale,
    unsaturated counterstain). Fluorescence (dark background): Otsu threshold of the brightest
    channel (clamped to ``[fluorescence_min_threshold, fluorescence_max_threshold]``): the mask is
    where the tissue glows, the inverse of brightfield's dark-on-bright.
    """
    if modality == "fluorescence":
        signal = overview.rgb.max(axis=2)
        signal = cv2.medianBlur(signal, 3) if min(signal.shape) >= 3 else signal
        otsu, _ = cv2.threshold(signal, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = float(np.clip(otsu, params.fluorescence_min_threshold, params.fluorescence_max_threshold))
        mask = signal > threshold
    else:
        sat = cv2.cvtColor(overview.rgb, cv2.COLOR_RGB2HSV)[..., 1]
        sat = cv2.medianBlur(sat, 5) if min(sat.shape) >= 5 else sat
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = float(np.clip(otsu, params.min_threshold, params.max_threshold))
        mask = sat > threshold
        if params.od_threshold > 0:
            rgb = cv2.medianBlur(overview.rgb, 5) if min(overview.rgb.shape[:2]) >= 5 else overview.rgb
            od = -np.log((rgb.astype(np.float32) + 1) / 256).sum(axis=2)
            mask |= od > params.od_threshold
    um = math.sqrt(overview.sx * overview.sy) * mpp  # microns per mask pixel
    closing = params.fluorescence_closing_um if modality == "fluorescence" else params.closing_um
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, _disk(closing / um)).astype(bool)
    px_per_mm2 = 1e6 / um ** 2
    mask = _drop_small(mask, params.min_area_mm2 * px_per_mm2)
    mask = _fill_holes(mask, params.max_hole_mm2 * px_per_mm2)
    return TissueMask(mask, overview.sx, overview.sy, threshold, float(otsu), mpp, modality)


def looks_fluorescent(rgb: np.ndarray) -> bool:
    """Whether an overview has a dark background (fluorescence), from its median brightest channel."""
    return bool(np.median(rgb.max(axis=2)) < FLUORESCENCE_MAX_MEDIAN)


def stain_modality(stain) -> str | None:
    """``fluorescence`` when a sheet ``stain`` names a fluorophore / IF (e.g. DAPI, FITC, "mIF"),
    ``brightfield`` for other non-empty stains (HE, IHC, Ki67, ...), None when empty."""
    if stain is None or (isinstance(stain, float) and math.isnan(stain)) or not str(stain).strip():
        return None
    words = set(re.split(r"[^a-z0-9]+", str(stain).lower()))
    return "fluorescence" if words & set(FLUORESCENCE_STAINS) else "brightfield"


def resolve_modality(setting: str, stain, slide_modality: str | None, rgb: np.ndarray) -> tuple[str, str]:
    """``(modality, source)``: config ``tissue.modality`` unless auto; else the sheet's stain; else
    the slide's metadata (DICOM illumination, OME acquisition mode); else the overview's background."""
    if setting in MODALITIES:
        return setting, "config tissue.modality"
    if m := stain_modality(stain):
        return m, f"sample sheet stain {str(stain)!r}"
    if slide_modality in MODALITIES:
        return slide_modality, "slide metadata"
    return ("fluorescence" if looks_fluorescent(rgb) else "brightfield"), "image (background brightness)"


def mask_geojson(mask: TissueMask, classification: dict = CLASSIFICATION) -> dict:
    """Tissue contours as a GeoJSON FeatureCollection that QuPath imports as annotations.

    One ``Polygon`` feature per tissue region (outer ring plus its holes), in level-0 pixel
    coordinates, from ``cv2.findContours`` (two-level hierarchy: outer boundaries and holes),
    simplified to within one mask pixel.
    """
    contours, hierarchy = cv2.findContours(mask.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return {"type": "FeatureCollection", "features": []}
    hierarchy = hierarchy.reshape(-1, 4)

    def ring(contour) -> list | None:
        # simplified to within one mask pixel: QuPath-friendly sizes without the pixel staircase
        pts = cv2.approxPolyDP(contour, 1.0, True).reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:
            return None
        xy = [[round((px + 0.5) * mask.sx, 1), round((py + 0.5) * mask.sy, 1)] for px, py in pts]
        return xy + [xy[0]]

    features = []
    for i, (_, _, child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        outer = ring(contours[i])
        if outer is None:
            continue
        holes = []
        while child != -1:
            hole = ring(contours[child])
            if hole is not None:
                holes.append(hole)
            child = hierarchy[child][0]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [outer, *holes]},
            "properties": {"objectType": "annotation", "classification": dict(classification),
                           "name": f"Tissue {len(features) + 1}"},
        })
    return {"type": "FeatureCollection", "features": features}


# ---------------------------------------------------------------------------------------------
# filtering


def filter_tiles(grid: pd.DataFrame, reader: TileReader, params: TissueParams = TissueParams(), *,
                 mask: TissueMask | None = None, threads: int = 1, modality: str | None = None) -> pd.DataFrame:
    """The grid plus per-tile scores and the ``tissue``, ``artefact`` and ``keep`` flags.

    Scores: ``edge_score``, ``tissue_fraction`` (mask coverage), ``background_fraction`` and
    ``ink_fraction`` (float32; NaN when the method is off or the tile was not read). With
    ``combine: all``, tiles the mask already rejects are not read (there is nothing left to
    decide); ``otsu`` needs ``mask``.
    """
    out = grid.copy()
    n = len(out)
    use_edge, use_otsu, art = "edge" in params.methods, "otsu" in params.methods, params.artefacts
    modality = modality or (mask.modality if mask is not None else "brightfield")
    if modality == "fluorescence":  # dark background and no pen under fluorescence: no background/ink veto
        art = ArtefactParams(**{**asdict(art), "enabled": False})
    if use_otsu and mask is None:
        raise ValueError("tissue method 'otsu' needs the slide's tissue mask")
    frac = mask.coverage(out) if use_otsu else np.full(n, np.nan, np.float32)
    otsu_ok = frac >= params.otsu.min_coverage if use_otsu else None

    # Tiles are read unless the mask alone has already rejected them: with combine "all", or when
    # the mask is the only method. Otherwise edge needs every tile, artefacts every tissue tile.
    decided_out = (~otsu_ok if use_otsu and (params.combine == "all" or not use_edge)
                   else np.zeros(n, bool))
    blur = params.blur
    need_pixels = use_edge or art.enabled or blur.enabled
    read = ~decided_out if need_pixels else np.zeros(n, bool)
    scores = np.full((n, 4), np.nan, np.float32)
    if read.any():
        fn = functools.partial(score_tile, edge=use_edge, artefacts=art.enabled, focus=blur.enabled)
        scores[read] = np.asarray(map_tiles(fn, out[read], reader, threads, what="scored"), np.float32)
    out["edge_score"], out["tissue_fraction"] = scores[:, 0], frac
    out["background_fraction"], out["ink_fraction"] = scores[:, 1], scores[:, 2]
    out["focus_score"] = scores[:, 3]

    votes = []
    if use_edge:
        votes.append(np.nan_to_num(scores[:, 0], nan=-np.inf) > params.edge_threshold)
    if use_otsu:
        votes.append(otsu_ok)
    tissue = np.logical_and.reduce(votes) if params.combine == "all" else np.logical_or.reduce(votes)
    artefact = np.zeros(n, bool)
    if art.enabled:
        artefact = read & ((scores[:, 1] > art.max_background) | (scores[:, 2] > art.max_ink))
    # out of focus: a veto like pen ink; tiles without a score (too little tissue) are not judged
    blurred = np.zeros(n, bool)
    if blur.enabled:
        blurred = read & (np.nan_to_num(scores[:, 3], nan=np.inf) < blur.min_focus)
    out["tissue"] = tissue
    out["artefact"] = tissue & artefact
    out["blurred"] = tissue & blurred & ~artefact
    out["keep"] = tissue & ~artefact & ~blurred
    out.attrs["tiles_read"] = int(read.sum())
    return out


def slide_status(tiles: pd.DataFrame) -> str:
    """``ok``, ``no tissue`` (tiles but none kept) or ``no tiles`` (slide smaller than a tile)."""
    if len(tiles) == 0:
        return "no tiles"
    return "ok" if tiles["keep"].any() else "no tissue"


def tile_counts(tiles: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per magnification: tiles before filtering, tissue, rejected as artefact, kept."""
    return {f"{m:g}": {"tiles": len(g), "tissue": int(g["tissue"].sum()),
                       "artefact": int(g["artefact"].sum()),
                       "blurred": int(g["blurred"].sum()) if "blurred" in g else 0, "kept": int(g["keep"].sum())}
            for m, g in tiles.groupby("magnification")}


# ---------------------------------------------------------------------------------------------
# QC outputs


KEPT_COLOUR, ARTEFACT_COLOUR, CONTOUR_COLOUR = (0, 170, 0), (230, 0, 200), (0, 90, 255)
BLURRED_COLOUR = (255, 140, 0)


def qc_thumbnail(thumb: Image.Image | openslide.AbstractSlide, tiles: pd.DataFrame, max_size: int = 1024, *,
                 slide_dimensions: tuple[int, int] | None = None, mask: TissueMask | None = None) -> Image.Image:
    """Thumbnail panels (one per magnification, finest first) with kept tiles in green, tiles
    rejected as artefacts (background, pen ink) in magenta and the tissue mask's contour in blue,
    above a legend.

    ``thumb`` is an overview image of the whole slide (or a slide, whose thumbnail is read).
    """
    if not isinstance(thumb, Image.Image):
        slide_dimensions = thumb.dimensions
        thumb = thumbnail(thumb, max_size)
    thumb = thumb.convert("RGB")
    if max(thumb.size) > max_size:
        thumb.thumbnail((max_size, max_size), Image.LANCZOS)
    sx, sy = thumb.size[0] / slide_dimensions[0], thumb.size[1] / slide_dimensions[1]
    if mask is not None:
        small = cv2.resize(mask.mask.astype(np.uint8), thumb.size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        draw = ImageDraw.Draw(thumb)
        for c in contours:
            pts = [tuple(p) for p in c.reshape(-1, 2).tolist()]
            if len(pts) > 1:
                draw.line(pts + [pts[0]], fill=CONTOUR_COLOUR, width=1)
    mags = sorted(tiles["magnification"].unique(), reverse=True) or [None]
    panels = []
    for mag in mags:
        g = tiles[tiles["magnification"] == mag] if mag is not None else tiles[:0]
        overlay = Image.new("RGBA", thumb.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        blurred = g[g["blurred"]] if "blurred" in g else g[:0]
        for sel, colour in ((g[g["keep"]], KEPT_COLOUR), (g[g["artefact"]], ARTEFACT_COLOUR),
                            (blurred, BLURRED_COLOUR)):
            boxes = sel[["x", "y", "w", "h"]].to_numpy(np.float64)
            outline = len(boxes) and boxes[0, 2] * sx >= 6  # outlines only where tiles are visible
            for x, y, w, h in boxes:
                draw.rectangle([x * sx, y * sy, (x + w) * sx - 1, (y + h) * sy - 1], fill=(*colour, 70),
                               outline=(*colour, 255) if outline else None)
        panel = Image.alpha_composite(thumb.convert("RGBA"), overlay).convert("RGB")
        ImageDraw.Draw(panel).text(
            (5, 5), f"{mag:g}x: {int(g['keep'].sum())} kept of {len(g)}" if mag is not None else "no tiles",
            fill=(0, 0, 0))
        panels.append(panel)
    legend = ((KEPT_COLOUR, "kept"), (ARTEFACT_COLOUR, "rejected: background / pen ink"),
              (BLURRED_COLOUR, "rejected: out of focus"),
              (CONTOUR_COLOUR, "tissue mask contour"))
    measure = ImageDraw.Draw(thumb)
    widths = [30 + int(measure.textlength(text)) for _, text in legend]
    out = Image.new("RGB", (max(sum(p.size[0] for p in panels), 5 + sum(widths)), thumb.size[1] + 18), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.size[0]
    draw = ImageDraw.Draw(out)
    x, y = 5, thumb.size[1] + 4
    for (colour, text), w in zip(legend, widths):
        draw.rectangle([x, y, x + 10, y + 10], fill=colour)
        draw.text((x + 14, y - 1), text, fill=(0, 0, 0))
        x += w
    return out


def qc_summary(meta: dict, tiles: pd.DataFrame, params: TissueParams, mask: TissueMask | None) -> dict:
    """The slide's QC record (``results/qc/<slide>/qc.json``): slide metadata from the tiling
    step plus the filter's settings, mask statistics and tile counts per magnification."""
    counts = tile_counts(tiles)
    mags = {}
    for key, info in sorted(meta.get("magnifications", {}).items(), key=lambda kv: float(kv[0])):
        mags[key] = {k: info[k] for k in ("target", "dz_level", "dz_downsample", "downsample", "tile_um",
                                          "upsampled", "n_partial_dropped") if k in info}
        mags[key].update(counts.get(key, {"tiles": 0, "tissue": 0, "artefact": 0, "blurred": 0, "kept": 0}))
    keys = ("slide_id", "path", "vendor", "reader", "scanner", "modality", "dimensions", "level_count", "level_dimensions",
            "level_downsamples", "mpp", "mpp_y", "mpp_source", "objective_power", "objective_source",
            "tile_size", "overlap", "limit_bounds", "content_hash")
    return {
        **{k: meta[k] for k in keys if k in meta},
        "status": slide_status(tiles),
        "tissue_filter": params.to_dict(),
        "tiles_read": int(tiles.attrs.get("tiles_read", len(tiles))),
        "mask": None if mask is None else {
            "otsu_threshold": mask.otsu, "threshold": mask.threshold, "shape": list(mask.mask.shape),
            "mask_um_per_px": math.sqrt(mask.sx * mask.sy) * mask.mpp, "tissue_area_mm2": mask.area_mm2,
        },
        "magnifications": mags,
    }


def qc_row(qc: dict) -> dict:
    """One flat row of the cohort QC table from a slide's ``qc.json``."""
    w, h = (qc.get("dimensions") or [None, None])[:2]
    row = {
        "slide_id": qc["slide_id"], "status": qc["status"], "vendor": qc.get("vendor"),
        "reader": qc.get("reader"), "scanner": qc.get("scanner"),
        "width": w, "height": h, "level_count": qc.get("level_count"),
        "mpp": qc.get("mpp"), "mpp_source": qc.get("mpp_source"),
        "objective_power": qc.get("objective_power"), "objective_source": qc.get("objective_source"),
        "modality": qc.get("modality"),
        "tissue_area_mm2": (qc.get("mask") or {}).get("tissue_area_mm2"),
        "otsu_threshold": (qc.get("mask") or {}).get("threshold"),
    }
    for key, m in qc.get("magnifications", {}).items():
        label = mag_label(float(key))
        for k in ("dz_level", "tile_um", "tiles", "artefact", "blurred", "kept"):
            row[f"{k}_{label}"] = m.get(k)
    return row


def qc_table(records: list[dict]) -> pd.DataFrame:
    """The cohort QC table (``results/qc/slides.tsv``): one row per slide."""
    return pd.DataFrame([qc_row(r) for r in records])


# ---------------------------------------------------------------------------------------------
# the whole step for one slide (rule filter_tissue)


@dataclass
class SlideQC:
    """What rule ``filter_tissue`` writes for one slide."""

    tiles: pd.DataFrame
    thumbnail: Image.Image
    geojson: dict
    qc: dict


def filter_slide(path: str, meta: dict, grid: pd.DataFrame, params: TissueParams, *, thumbnail_size: int = 1024,
                 threads: int = 1, stain: str | None = None, logger: logging.Logger = log) -> SlideQC:
    """Rule ``filter_tissue`` for one slide: tissue mask, per-tile scores and flags, QC thumbnail,
    contours and the ``qc.json`` record. ``meta`` is the slide's ``slide.json`` (its ``reader``
    opens the slide, so tiles come from the library that made the grid)."""
    from slidesnake.slide import open_slide

    slide_id, reader_name = meta["slide_id"], meta.get("reader", "auto")
    slide = open_slide(path, slide_id, reader_name)
    # The mask is always made (contours and tissue area are QC outputs); it decides tiles only
    # when 'otsu' is one of the methods.
    overview = read_overview(slide, params.otsu.mask_mpp / meta["mpp"], slide_id=slide_id, path=path)
    modality, modality_source = resolve_modality(params.modality, stain, meta.get("modality"), overview.rgb)
    logger.info("%s: %s (%s)", slide_id, modality, modality_source)
    mask = tissue_mask(overview, meta["mpp"], params.otsu, modality)
    logger.info("%s: tissue mask %dx%d px at %.1f um/px, Otsu threshold %.0f (used %.0f), tissue %.2f mm2",
                slide_id, mask.mask.shape[1], mask.mask.shape[0], params.otsu.mask_mpp, mask.otsu,
                mask.threshold, mask.area_mm2)
    # QC thumbnail: from the mask's overview when that is fine enough, else read at its own size;
    # the overview is dropped before tile-reading workers are forked.
    ds = max(slide.dimensions) / thumbnail_size
    if max(overview.rgb.shape[:2]) >= thumbnail_size:
        w, h = max(1, round(slide.dimensions[0] / ds)), max(1, round(slide.dimensions[1] / ds))
        thumb = Image.fromarray(cv2.resize(overview.rgb, (w, h), interpolation=cv2.INTER_AREA))
    else:
        thumb = Image.fromarray(read_overview(slide, ds, slide_id=slide_id, path=path).rgb)
    # mean stain vectors for the cohort audit (brightfield; from the mask's overview, tissue only)
    from slidesnake.audit import stain_vectors

    stains = stain_vectors(overview.rgb[mask.mask]) if modality == "brightfield" and mask.mask.any() else None
    del overview
    dimensions = slide.dimensions
    slide.close()

    reader = TileReader(path, meta["tile_size"], meta["overlap"], meta["limit_bounds"], slide_id=slide_id,
                        reader=reader_name)
    tiles = filter_tiles(grid, reader, params, mask=mask, threads=threads)
    qc = qc_summary(meta, tiles, params, mask)
    qc["modality"], qc["modality_source"] = modality, modality_source
    qc["stain_vectors"] = stains
    for mag, c in qc["magnifications"].items():
        logger.info("%sx: kept %d of %d tiles (%d tissue by %s (%s), %d of them rejected as artefacts, "
                    "%d as out of focus)", mag, c["kept"], c["tiles"], c["tissue"], "+".join(params.methods),
                    params.combine, c["artefact"], c["blurred"])
    image = qc_thumbnail(thumb, tiles, thumbnail_size, slide_dimensions=dimensions, mask=mask)
    return SlideQC(tiles, image, mask_geojson(mask), qc)
