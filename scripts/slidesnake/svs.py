"""A pyramidal, tiled, JPEG-compressed TIFF in Aperio SVS layout, streamed tile by tile.

:func:`write_slide` writes any ``render(x, y, width, height, downsample)`` callable (:data:`RenderFn`)
as a slide that OpenSlide opens as vendor ``aperio``: the demo cohort's synthetic slides
(:mod:`slidesnake.demo`) and the heatmap export on the slide's coordinates
(:func:`slidesnake.heatmap.write_heatmap_slide`). Every level is rendered tile by tile straight at
that level's scale, so memory does not grow with slide size; the file is written atomically.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import tifffile

from slidesnake.io import atomic_path

APERIO_HEADER = "Aperio Image Library v12.0.15"
DEFAULT_DOWNSAMPLES = (1, 4, 16)
DEFAULT_TILE = 256
DEFAULT_QUALITY = 80
THUMBNAIL_MAX_SIDE = 768
#: Classic TIFF offsets are 32 bit: switch to BigTIFF when the raw pixels could exceed this.
BIGTIFF_THRESHOLD_BYTES = 2**32 - 2**25


#: ``render(x, y, width, height, downsample) -> (height, width, 3) uint8``: pixel ``(i, j)`` shows
#: the level-0 point ``(x + (j + 0.5) * downsample, y + (i + 0.5) * downsample)``.
RenderFn = Callable[[float, float, int, int, float], np.ndarray]


# --------------------------------------------------------------------------------------------
# Aperio SVS writer.
# --------------------------------------------------------------------------------------------


def pyramid_levels(
    width: int, height: int, tile: int = DEFAULT_TILE, downsamples: Sequence[int] = DEFAULT_DOWNSAMPLES
) -> list[tuple[int, int, int]]:
    """``(width, height, downsample)`` of the levels written: level 0 plus every coarser level
    whose both sides are at least one tile."""
    if not downsamples or downsamples[0] != 1 or list(downsamples) != sorted(set(downsamples)):
        raise ValueError(f"downsamples must start at 1 and increase: {downsamples}")
    levels = [(width, height, 1)]
    for ds in downsamples[1:]:
        w, h = width // ds, height // ds
        if w >= tile and h >= tile:
            levels.append((w, h, int(ds)))
    return levels


def _aperio_description(
    width: int,
    height: int,
    tile: int,
    quality: int,
    objective: float,
    mpp: float,
    level: tuple[int, int] | None = None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """Aperio ImageDescription: header line, geometry (``-> WxH`` for a reduced level), fields."""
    desc = f"{APERIO_HEADER} \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    if level is not None:
        desc += f" -> {level[0]}x{level[1]}"
    desc += f" JPEG/RGB Q={quality}|AppMag = {objective:g}|MPP = {mpp:g}"
    for key, value in (extra or {}).items():
        desc += f"|{key} = {value}"
    return desc


def _iter_tiles(
    render: RenderFn, width: int, height: int, ds: int, tile: int, workers: int
) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order, each rendered straight from the scene.

    With ``workers > 1`` tiles are rendered by a thread pool (NumPy and OpenCV release the GIL)
    at most ``2 * workers`` tiles ahead of the writer, which JPEG-encodes meanwhile.
    """

    def one(tx: int, ty: int) -> np.ndarray:
        rgb = render(tx * tile * ds, ty * tile * ds, tile, tile, float(ds))
        if rgb.shape != (tile, tile, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"render returned {rgb.shape} {rgb.dtype}, expected ({tile}, {tile}, 3) uint8")
        return rgb

    addresses = ((tx, ty) for ty in range(-(-height // tile)) for tx in range(-(-width // tile)))
    if workers <= 1:
        for tx, ty in addresses:
            yield one(tx, ty)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[np.ndarray]] = deque()
        for tx, ty in addresses:
            pending.append(pool.submit(one, tx, ty))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _render_blocks(render: RenderFn, width: int, height: int, ds: float, block: int) -> np.ndarray:
    """Render a (small) whole image block by block, bounding the scene's working memory."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            h, w = min(block, height - y0), min(block, width - x0)
            out[y0 : y0 + h, x0 : x0 + w] = render(x0 * ds, y0 * ds, w, h, ds)
    return out


def write_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    render: RenderFn,
    *,
    mpp: float = 0.5,
    objective: float = 20,
    tile: int = DEFAULT_TILE,
    downsamples: Sequence[int] = DEFAULT_DOWNSAMPLES,
    quality: int = DEFAULT_QUALITY,
    thumbnail_max: int = THUMBNAIL_MAX_SIDE,
    bigtiff: bool | None = None,
    metadata: Mapping[str, object] | None = None,
    workers: int = 1,
) -> list[tuple[int, int, int]]:
    """Write a pyramidal, tiled, JPEG TIFF in Aperio SVS layout, atomically.

    IFD 0 is level 0, IFD 1 a stripped thumbnail (OpenSlide's ``associated_images['thumbnail']``),
    then the coarser levels. Every level is streamed tile by tile from ``render`` at that level's
    downsample, so peak memory is a few tiles whatever the slide size. Tiles are JPEG in YCbCr
    with 4:2:0 chroma subsampling (tifffile's default for RGB JPEG; PhotometricInterpretation is
    YCbCr), which OpenSlide decodes to RGB.

    Args:
        path: output file (written to a temporary name beside it and renamed on success).
        width, height: level-0 size in pixels.
        render: ``render(x, y, w, h, downsample)`` -> ``(h, w, 3)`` uint8, see :data:`RenderFn`.
        mpp: micrometres per level-0 pixel (``aperio.MPP``).
        objective: objective power (``aperio.AppMag``).
        tile: tile side, a multiple of 16.
        downsamples: integer downsample per level, starting with 1; coarser levels smaller than a
            tile are dropped.
        quality: JPEG quality.
        thumbnail_max: longest side of the thumbnail.
        bigtiff: force (or forbid) BigTIFF; by default used when the raw pixels exceed ~4 GiB.
        metadata: extra ``key = value`` pairs appended to the level-0 description.
        workers: threads rendering tiles (``render`` must then be thread-safe, as
            :meth:`HEScene.render` is); the output does not depend on it.

    Returns:
        ``(width, height, downsample)`` of the levels written.
    """
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (JPEG 4:2:0 blocks), got {tile}")
    levels = pyramid_levels(width, height, tile, downsamples)
    if bigtiff is None:
        bigtiff = width * height * 3 * 4 // 3 > BIGTIFF_THRESHOLD_BYTES
    common = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(quality)},
        metadata=None,
        software=False,
    )
    thumb_ds = max(1.0, max(width, height) / thumbnail_max)
    tw, th = max(1, round(width / thumb_ds)), max(1, round(height / thumb_ds))
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for index, (w, h, ds) in enumerate(levels):
            if ds == 1:
                desc = _aperio_description(width, height, tile, quality, objective, mpp, extra=metadata)
            else:
                desc = _aperio_description(width, height, tile, quality, objective, mpp, level=(w, h))
            tif.write(
                _iter_tiles(render, w, h, ds, tile, workers),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                description=desc,
                **common,
            )
            if index == 0:
                thumb = _render_blocks(render, tw, th, thumb_ds, tile)
                tif.write(
                    thumb,
                    rowsperstrip=16,
                    description=f"{APERIO_HEADER} \r\n{width}x{height} -> {tw}x{th} - "
                    f"|AppMag = {objective:g}|MPP = {mpp:g}",
                    **common,
                )
    return levels
