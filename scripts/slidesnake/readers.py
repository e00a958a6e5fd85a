"""Slide readers behind :func:`slidesnake.slide.open_slide`: one OpenSlide-like object whatever the file.

Order (``tiling.reader: auto``, see docs/design.md "Slide readers"):

1. **OpenSlide** for every format it detects (SVS, NDPI, MRXS, DICOM, generic tiled TIFF, ...).
2. **wsidicom** for DICOM-WSI that OpenSlide does not open: a folder of instances, or one instance
   file (its siblings of the same series are opened with it). Instances without the ``ImageType``
   attribute (OpenSlide: "Couldn't get image flavor") are read as pyramid levels, with a warning.
3. **tiffslide** (tifffile) for TIFFs OpenSlide does not recognise: OME-TIFF (the MPP comes from
   OME ``PhysicalSizeX``/``Y`` with their unit) and plain or pyramidal TIFF.
4. **image** (PIL, OpenSlide's ``ImageSlide``) for PNG/JPEG and other plain images; the MPP comes
   from the sample sheet.

Every reader is seen through OpenSlide's API (:class:`openslide.AbstractSlide`: ``read_region``
with level-0 coordinates returning RGBA, ``level_dimensions``, ``level_downsamples``,
``properties``), so DeepZoom grids, overviews and tile reads are the same code for all of them:
a grid depends only on the level-0 size, so it is identical whichever library opened the file.
What each non-OpenSlide reader knows about the slide goes into ``properties`` under its own
prefix (``ome.``, ``dicom.``, ``tiff.``), which :func:`slidesnake.slide.resolve_resolution` reads.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import numpy as np
import openslide
from PIL import Image

log = logging.getLogger(__name__)

READERS = ("openslide", "wsidicom", "tiffslide", "image")
#: Property naming the reader (every slide that :func:`open_any` returns has it, also OpenSlide's).
PROPERTY_READER = "slidesnake.reader"
#: Property naming the scanner (manufacturer and model), where the file says.
PROPERTY_SCANNER = "slidesnake.scanner"
#: Property naming the imaging modality ("brightfield" or "fluorescence"), where the file says.
PROPERTY_MODALITY = "slidesnake.modality"

# OME length units in microns
_OME_UNITS = {"µm": 1.0, "um": 1.0, "μm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4,
              "pm": 1e-6, "in": 25400.0, "mi": None, "ft": 304800.0, "yd": 914400.0}


class ReaderError(Exception):
    """A reader cannot open a file: ``problem`` and ``fix`` become a one-line SlideError."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}; {fix}")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---------------------------------------------------------------------------------------------
# the adapter: OpenSlide's API over another library


class AdapterSlide(openslide.AbstractSlide):
    """OpenSlide's API over a reader of another library.

    ``read_level(level, x, y, w, h)`` returns an RGB(A) PIL image of the level's pixels
    ``[x, x + w) x [y, y + h)`` (inside the level); this class does the level-0 coordinates of
    ``read_region``, clips to the image and leaves what lies outside transparent, as OpenSlide does.
    """

    def __init__(self, reader: str, level_dimensions, properties: dict, read_level: Callable,
                 close: Callable = lambda: None, associated: dict | None = None, description: str = ""):
        super().__init__()
        self.reader = reader
        self._dims = tuple((int(w), int(h)) for w, h in level_dimensions)
        w0, h0 = self._dims[0]
        # as OpenSlide does: a level's downsample is the mean of its two axes' ratios
        self._downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self._dims)
        self._props = {**{str(k): str(v) for k, v in properties.items() if v is not None},
                       PROPERTY_READER: reader}
        self._read_level, self._close = read_level, close
        self._associated = associated or {}
        self._description = description

    def __repr__(self) -> str:
        return f"AdapterSlide({self.reader}: {self._description})"

    @classmethod
    def detect_format(cls, filename) -> str | None:
        return None

    def close(self) -> None:
        self._close()

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self):
        return self._dims

    @property
    def level_downsamples(self):
        return self._downsamples

    @property
    def properties(self):
        return self._props

    @property
    def associated_images(self):
        return self._associated

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """OpenSlide's rule: the level with the largest downsample not above ``downsample``."""
        best = 0
        for i, d in enumerate(self._downsamples):
            if d <= downsample + 1e-9:
                best = i if d >= self._downsamples[best] else best
        return best

    def read_region(self, location, level: int, size) -> Image.Image:
        x0, y0 = location
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise openslide.OpenSlideError(f"invalid region size {w}x{h}")
        ds = self._downsamples[level]
        lw, lh = self._dims[level]
        # level coordinates of the region's top-left corner (OpenSlide truncates the same way)
        lx, ly = int(x0 // ds), int(y0 // ds)
        cx0, cy0, cx1, cy1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        out = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        if cx1 > cx0 and cy1 > cy0:
            try:
                part = self._read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
            except openslide.OpenSlideError:
                raise
            except Exception as err:  # libraries raise their own types: one kind for callers
                raise openslide.OpenSlideError(f"{self.reader}: {_one_line(err)}") from None
            part = part.convert("RGBA") if part.mode != "RGBA" else part
            if part.size != (cx1 - cx0, cy1 - cy0):
                part = part.resize((cx1 - cx0, cy1 - cy0))
            out.paste(part, (cx0 - lx, cy0 - ly))
        return out


def reader_of(slide: openslide.AbstractSlide) -> str:
    """Name of the reader that opened ``slide`` (one of :data:`READERS`)."""
    if isinstance(slide, AdapterSlide):
        return slide.reader
    if isinstance(slide, openslide.ImageSlide):
        return "image"
    return "openslide"


# ---------------------------------------------------------------------------------------------
# tiffslide: OME-TIFF and plain TIFF


def _ome_properties(xml: str | None) -> dict:
    """``ome.*`` properties from an OME-XML block: pixel size in microns (unit converted),
    objective, microscope, channels and whether they say fluorescence."""
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    ns = {"ome": root.tag[1:].split("}")[0]} if root.tag.startswith("{") else {"ome": ""}
    q = (lambda t: f"ome:{t}") if ns["ome"] else (lambda t: t)
    props: dict = {}
    pixels = root.find(f".//{q('Image')}/{q('Pixels')}", ns)
    if pixels is not None:
        for axis in ("X", "Y"):
            value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
            scale = _OME_UNITS.get(unit)
            if value is not None:
                props[f"ome.PhysicalSize{axis}"] = value
                props[f"ome.PhysicalSize{axis}Unit"] = unit
                if scale:
                    props[f"ome.mpp-{axis.lower()}"] = float(value) * scale
        channels = pixels.findall(q("Channel"), ns)
        props["ome.SizeC"] = pixels.get("SizeC")
        modes = {(c.get("AcquisitionMode") or "") + " " + (c.get("IlluminationType") or "") + " "
                 + (c.get("ContrastMethod") or "") for c in channels}
        text = " ".join(modes).lower()
        if "fluorescence" in text or "epifluorescence" in text:
            props[PROPERTY_MODALITY] = "fluorescence"
        elif "brightfield" in text or "transmitted" in text:
            props[PROPERTY_MODALITY] = "brightfield"
    objective = root.find(f".//{q('Objective')}", ns)
    if objective is not None and objective.get("NominalMagnification"):
        props["ome.NominalMagnification"] = objective.get("NominalMagnification")
    micro = root.find(f".//{q('Microscope')}", ns)
    if micro is not None:
        scanner = " ".join(v for v in (micro.get("Manufacturer"), micro.get("Model")) if v)
        if scanner:
            props[PROPERTY_SCANNER] = scanner
    props["ome.Creator"] = root.get("Creator")
    return props


def open_tiffslide(path: str) -> AdapterSlide:
    """An OME-TIFF or plain (pyramidal or single-level) TIFF through tiffslide."""
    import tiffslide
    import tifffile

    if not _is_tiff(path):
        raise ReaderError("not a TIFF file, but tiling.reader is tiffslide",
                          "set tiling.reader: auto (tiffslide reads only TIFF-based files)")
    try:
        ts = tiffslide.TiffSlide(path)
    except Exception as err:
        raise ReaderError(f"tiffslide cannot open it ({_one_line(err)})",
                          "check that the file is a complete TIFF (re-export it, e.g. with bfconvert "
                          "-pyramid-resolutions or vips tiffsave --pyramid)") from None
    tf = ts.ts_tifffile
    props: dict = {}
    page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    if unit is not None and int(unit.value) in (2, 3):
        props["tiff.ResolutionUnit"] = "inch" if int(unit.value) == 2 else "centimeter"
        for t in ("XResolution", "YResolution"):
            if t in tags:
                num, den = tags[t].value
                props[f"tiff.{t}"] = num / den if den else None
    for t in ("ImageDescription", "Make", "Model", "Software"):
        if t in tags and isinstance(tags[t].value, str):
            props[f"tiff.{t}"] = tags[t].value[:500]
    is_ome = bool(tf.is_ome)
    if is_ome:
        props.update(_ome_properties(tf.ome_metadata))
    vendor = ts.properties.get("tiffslide.vendor")
    if vendor:
        props[openslide.PROPERTY_NAME_VENDOR] = vendor
        for k in ("tiffslide.mpp-x", "tiffslide.mpp-y", "tiffslide.objective-power"):
            props[k] = ts.properties.get(k)
    else:
        props[openslide.PROPERTY_NAME_VENDOR] = "ome-tiff" if is_ome else "generic-tiff"
    if PROPERTY_SCANNER not in props and ("tiff.Make" in props or "tiff.Model" in props):
        props[PROPERTY_SCANNER] = " ".join(props[k] for k in ("tiff.Make", "tiff.Model") if k in props)
    if page.samplesperpixel not in (1, 3, 4) or (len(page.shape) > 2 and page.shape[0] not in (1, 3, 4)
                                                   and page.samplesperpixel == 1 and page.planarconfig == 2):
        raise ReaderError(f"an image of {page.samplesperpixel} channels per pixel, not RGB",
                          "export the channels as an RGB image (e.g. a composite in QuPath or Fiji)")

    def read_level(level, x, y, w, h):
        ds = ts.level_downsamples[level]
        # tiffslide takes level-0 coordinates, like OpenSlide
        return ts.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))

    return AdapterSlide("tiffslide", ts.level_dimensions, props, read_level, ts.close,
                        description=os.path.basename(path))


# ---------------------------------------------------------------------------------------------
# wsidicom: DICOM-WSI


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Part 10 file ("DICM" after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


_WSI_SOP = "1.2.840.10008.5.1.4.1.1.77.1.6"


def dicom_series_files(path: str | os.PathLike) -> list[Path]:
    """The WSI instance files of the series ``path`` belongs to: for a folder, every WSI instance
    in it (one series expected); for a file, it and its siblings with the same SeriesInstanceUID."""
    import pydicom

    path = Path(path)
    candidates = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else sorted(
        p for p in path.parent.iterdir() if p.is_file())
    series = None
    if path.is_file():
        series = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get(
            "SeriesInstanceUID")
    out = []
    for p in candidates:
        if not is_dicom(p):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"])
        except Exception:  # noqa: BLE001 - unreadable headers are not part of the series
            continue
        if ds.get("SOPClassUID") == _WSI_SOP and (series is None or ds.get("SeriesInstanceUID") == series):
            out.append(p)
    return out


_DICOM_FS_COUNTER = [0]


def _tolerant_dicom_paths(files: list[Path], warn: Callable[[str], None]) -> list[str]:
    """Paths wsidicom can open: files whose ``ImageType`` is missing are given one (pyramid level,
    ``DERIVED\\PRIMARY\\VOLUME\\NONE``) in an in-memory copy (fsspec ``memory://``), with a warning."""
    import fsspec
    import pydicom

    heads = {p: pydicom.dcmread(p, stop_before_pixels=True,
                                specific_tags=["ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"])
             for p in files}
    missing = [p for p, ds in heads.items() if "ImageType" not in ds]
    if not missing:
        return [str(p) for p in files]
    # an instance without ImageType is taken for a pyramid level when its shape matches the
    # largest instance's (labels and overviews have other aspect ratios); else it is left out
    sizes = {p: (int(ds.get("TotalPixelMatrixColumns") or 0), int(ds.get("TotalPixelMatrixRows") or 0))
             for p, ds in heads.items()}
    big = max(sizes.values(), key=lambda s: s[0] * s[1])
    aspect = big[0] / big[1] if big[1] else 0
    fs = fsspec.filesystem("memory")
    _DICOM_FS_COUNTER[0] += 1
    root = f"memory://slidesnake-dicom/{os.getpid()}-{_DICOM_FS_COUNTER[0]}"
    out, patched, dropped = [], [], []
    for p in files:
        if p not in missing:
            out.append(str(p))
            continue
        w, h = sizes[p]
        if not (w and h and aspect and abs(w / h - aspect) <= 0.02 * aspect):
            dropped.append(p.name)
            continue
        ds = pydicom.dcmread(p)
        ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
        buf = io.BytesIO()
        ds.save_as(buf)
        target = f"{root}/{p.name}"
        fs.pipe(target, buf.getvalue())
        out.append(target)
        patched.append(p.name)
    if patched:
        warn(f"DICOM instance(s) {', '.join(patched)} lack the ImageType attribute (0008,0008): read as "
             "pyramid levels from an in-memory copy; fix the export with "
             "dcmodify -i \"(0008,0008)=DERIVED\\PRIMARY\\VOLUME\\NONE\"")
    if dropped:
        warn(f"DICOM instance(s) {', '.join(dropped)} lack ImageType and do not match the pyramid's shape: "
             "left out (label or overview images)")
    return out


def open_wsidicom(path: str, warn: Callable[[str], None] = log.warning) -> AdapterSlide:
    """A DICOM-WSI series (a folder of instances, or one instance and its siblings) through wsidicom."""
    from wsidicom import WsiDicom

    files = dicom_series_files(path)
    if not files:
        raise ReaderError("no DICOM whole-slide image instances (VL Whole Slide Microscopy) found",
                          "point the sheet's 'path' at the folder (or one .dcm file) of the WSI series")
    paths = _tolerant_dicom_paths(files, warn)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wsi = WsiDicom.open(paths)
    except Exception as err:
        raise ReaderError(f"wsidicom cannot open the series ({_one_line(err)})",
                          "re-export the slide from the PACS / converter as a complete DICOM-WSI series "
                          "(all instances in one folder)") from None
    levels = sorted(wsi.levels, key=lambda lv: lv.size.width, reverse=True)
    props: dict = {openslide.PROPERTY_NAME_VENDOR: "dicom"}
    mpp = levels[0].mpp  # wsidicom: microns per pixel (x = width, y = height)
    if mpp is not None:
        props["dicom.mpp-x"], props["dicom.mpp-y"] = float(mpp.width), float(mpp.height)
    try:
        md = wsi.metadata
        eq = md.equipment
        scanner = " ".join(v for v in (eq.manufacturer, eq.model_name) if v) if eq else ""
        if scanner:
            props[PROPERTY_SCANNER] = scanner
            props["dicom.Manufacturer"] = eq.manufacturer
            props["dicom.ManufacturerModelName"] = eq.model_name
        paths_ = md.pyramid.optical_paths if md.pyramid else []
        for op in paths_:
            if op.objective and op.objective.objective_power:
                props["dicom.ObjectiveLensPower"] = float(op.objective.objective_power)
            meanings = " ".join(c.meaning for c in (op.illumination_types or []) if c.meaning).lower()
            if "fluorescence" in meanings:
                props[PROPERTY_MODALITY] = "fluorescence"
            elif "brightfield" in meanings:
                props.setdefault(PROPERTY_MODALITY, "brightfield")
    except Exception as err:  # noqa: BLE001 - optional attributes: their absence is tolerated
        warn(f"DICOM metadata partly unreadable ({_one_line(err)}): scanner / objective left blank")

    def read_level(level, x, y, w, h):
        return wsi.read_region((x, y), levels[level].level, (w, h))

    return AdapterSlide("wsidicom", [(lv.size.width, lv.size.height) for lv in levels], props, read_level,
                        wsi.close, description=os.path.basename(str(path)))


# ---------------------------------------------------------------------------------------------
# choosing a reader


def _is_tiff(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False


def _with_props(slide: openslide.AbstractSlide, reader: str) -> openslide.AbstractSlide:
    """OpenSlide / ImageSlide objects with the reader property (and DICOM modality) added."""
    props = dict(slide.properties)
    props[PROPERTY_READER] = reader
    if reader == "image":
        props.setdefault(openslide.PROPERTY_NAME_VENDOR, "image")
    slide._slidesnake_props = props  # noqa: SLF001 - read by slide_properties()
    return slide


def slide_properties(slide: openslide.AbstractSlide) -> dict:
    """``slide.properties`` plus the ``slidesnake.*`` properties the reader layer adds."""
    return getattr(slide, "_slidesnake_props", None) or dict(slide.properties)


def open_any(path: str | os.PathLike, reader: str = "auto",
             warn: Callable[[str], None] = log.warning) -> openslide.AbstractSlide:
    """Open ``path`` with ``reader`` (one of :data:`READERS`, or ``auto``: see the module docstring).

    Raises :class:`ReaderError` (problem + fix) when no reader opens it.
    """
    path = str(path)
    if reader not in ("auto", *READERS):
        raise ReaderError(f"unknown reader {reader!r}", f"set tiling.reader to auto or one of {list(READERS)}")
    if reader == "openslide":
        return _with_props(_openslide(path), "openslide")
    if reader == "wsidicom":
        return open_wsidicom(path, warn)
    if reader == "tiffslide":
        return open_tiffslide(path)
    if reader == "image":
        return _with_props(_image(path), "image")

    if os.path.isdir(path):
        return open_wsidicom(path, warn)
    fmt = openslide.OpenSlide.detect_format(path)
    if fmt is not None:
        try:
            return _with_props(openslide.OpenSlide(path), "openslide")
        except openslide.OpenSlideError as err:
            msg = _one_line(err)
            if fmt == "dicom":
                warn(f"OpenSlide cannot open this DICOM-WSI ({msg}); trying wsidicom")
                return open_wsidicom(path, warn)
            raise ReaderError(f"cannot be opened (OpenSlide, format {fmt}: {msg})",
                              "the file is damaged or an unsupported variant: re-copy or re-export it "
                              "from the scanner") from None
    if is_dicom(path):
        return open_wsidicom(path, warn)
    if _is_tiff(path):
        return open_tiffslide(path)
    return _with_props(_image(path), "image")


def _openslide(path: str) -> openslide.OpenSlide:
    try:
        return openslide.OpenSlide(path)
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as err:
        raise ReaderError(f"OpenSlide cannot open it ({_one_line(err)})",
                          "set tiling.reader: auto (or the reader for this format)") from None


def _image(path: str) -> openslide.ImageSlide:
    try:
        return openslide.ImageSlide(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ReaderError(f"cannot be opened (no reader recognises the file: {_one_line(err)})",
                          "convert it to a pyramidal TIFF (bfconvert -pyramid-resolutions, or vips tiffsave "
                          "--pyramid) or check that it is a slide") from None


def region_rgb(slide: openslide.AbstractSlide, location, level: int, size) -> np.ndarray:
    """``read_region`` as an RGB uint8 array (transparent pixels white)."""
    rgba = np.asarray(slide.read_region(location, level, size), np.uint16)
    a = rgba[..., 3:4]
    return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)

