import json

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from slidesnake.demo import write_slide
from slidesnake.slide import open_slide, resolve_resolution
from slidesnake.tiling import TileReader, build_grid
from slidesnake.tissue import (ArtefactParams, TissueMask, TissueParams, artefact_fractions,
                               edge_density, filter_tiles, mask_geojson, qc_summary, qc_table,
                               qc_thumbnail, read_overview, slide_status, tissue_mask)
from conftest import shared_slide

GLASS = (242, 241, 245)


def run_filter(path, mags=(20,), params=TissueParams(), threads=1, **res_kw):
    """grid + tissue filter of a slide, as the workflow's tile and filter_tissue rules do it."""
    slide = open_slide(path, "s")
    res = resolve_resolution(slide.properties, "s", path, **res_kw)
    grid, _ = build_grid(slide, res, list(mags), 224)
    mask = tissue_mask(read_overview(slide, params.otsu.mask_mpp / res.mpp), res.mpp, params.otsu)
    tiles = filter_tiles(grid, TileReader(path, 224), params, mask=mask, threads=threads)
    return slide, tiles, mask


def array_slide(path, rgb, mpp, objective):
    """Write an RGB array as a pyramidal Aperio-layout slide (demo.write_slide), glass beyond it."""
    h, w = rgb.shape[:2]

    def render(x, y, tw, th, ds):
        x0, y0, x1, y1 = int(x), int(y), int(round(x + tw * ds)), int(round(y + th * ds))
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        out[:] = GLASS
        crop = rgb[y0:min(y1, h), x0:min(x1, w)]
        out[:crop.shape[0], :crop.shape[1]] = crop
        return out if ds == 1 else cv2.resize(out, (tw, th), interpolation=cv2.INTER_AREA)

    write_slide(path, w, h, render, mpp=mpp, objective=objective, downsamples=(1, 4))
    return path


def read_all(path):
    s = open_slide(path, "s")
    return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


def test_edge_density_blank_vs_texture():
    rng = np.random.default_rng(0)
    blank = np.full((224, 224, 3), 242, np.uint8)
    texture = rng.integers(60, 230, (224, 224, 3), dtype=np.uint8)
    assert edge_density(blank) < 5  # only the filter's image-border response
    assert edge_density(texture) > 15
    assert artefact_fractions(blank) == (1.0, 0.0)
    assert artefact_fractions(np.zeros((8, 8, 3), np.uint8))[0] == 1.0  # black background


def test_cmu_tissue_strip_kept_and_glass_rejected(cmu_small):
    slide, tiles, mask = run_filter(cmu_small, threads=2)
    assert len(tiles) == 117 and tiles[["tissue_fraction"]].notna().all().all()
    # Tissue occupies the centre columns of this strip; the left margin is glass.
    mean_by_col = tiles.groupby("col")["keep"].mean()
    assert mean_by_col.max() > 0.7 and mean_by_col.iloc[:2].max() == 0
    assert tiles["keep"].sum() >= 40
    # Mostly-white tiles (mean brightness > 230) are rejected.
    reader = TileReader(cmu_small, 224)
    bright = np.array([reader.read(*r).mean() > 230 for r in
                       tiles[["dz_tile_size", "dz_level", "col", "row"]].to_numpy()])
    assert bright.sum() > 20 and not tiles.loc[bright, "keep"].any()
    assert tiles[["edge_score", "background_fraction", "ink_fraction"]].notna().all().all()
    # The mask and the edge method agree on most tiles of this slide.
    agree = (tiles["edge_score"] > 15) == (tiles["tissue_fraction"] >= 0.25)
    assert agree.mean() > 0.9
    assert 0.3 < mask.area_mm2 < 1.0  # the strip is about 0.6 mm2
    # combine: all: tiles outside the mask are never read (scores left empty)
    grid = tiles[["tile_id", "magnification", "dz_tile_size", "dz_level", "col", "row", "x", "y", "w", "h"]]
    both = filter_tiles(grid, reader, TissueParams(combine="all"), mask=mask)
    unread = both["tissue_fraction"] < 0.25
    assert both.loc[unread, "edge_score"].isna().all() and both.loc[~unread, "edge_score"].notna().all()
    assert both.attrs["tiles_read"] == (~unread).sum() and (both["keep"] <= tiles["keep"]).all()


def test_kidney_blank_glass_rejected():
    # Plain TIFF (PIL fallback), no MPP: < 1% tissue, the rest blank glass.
    path = shared_slide("real/tiff/kidney-48-5.tif")
    slide, tiles, mask = run_filter(path, default_mpp=0.5)
    assert len(tiles) == 24
    reader = TileReader(path, 224)
    white = np.array([reader.read(*r).mean() > 230 for r in
                      tiles[["dz_tile_size", "dz_level", "col", "row"]].to_numpy()])
    assert white.sum() >= 20 and not tiles.loc[white, "keep"].any()
    assert tiles["keep"].mean() < 0.1


def _ink_strokes(rgb, tiles):
    """Draw green, blue and black ink strokes (multiplied over the tissue, as ink on a slide looks)
    across three rows of kept 20x tiles; return the inked image and each tile's ink coverage."""
    inked, cover = rgb.copy(), np.zeros(rgb.shape[:2], np.uint8)
    kept = tiles[tiles["keep"]]
    rows = sorted(kept["row"].unique())
    for row, colour in zip((rows[2], rows[len(rows) // 2], rows[-3]), ((30, 140, 80), (30, 60, 170), (35, 35, 40))):
        r = kept[kept["row"] == row]
        y = int(r["y"].iloc[0] + 112)
        stroke = np.zeros_like(cover)
        cv2.line(stroke, (int(r["x"].min()), y), (int(r["x"].max() + 224), y), 1, thickness=150)
        ink = (inked.astype(np.uint16) * np.array(colour) // 255).astype(np.uint8)
        inked = np.where(stroke[..., None] > 0, ink, inked)
        cover |= stroke
    frac = np.array([cover[y:y + 224, x:x + 224].mean() for x, y in tiles[["x", "y"]].to_numpy()])
    return inked, frac


def test_pen_marks_rejected_clean_tissue_kept(cmu_small, tmp_path):
    # A copy of the real CMU-1 region with pen strokes drawn on it, written as a pyramidal slide.
    _, clean, _ = run_filter(cmu_small)
    rgb = read_all(cmu_small)
    inked, ink_cover = _ink_strokes(rgb, clean)
    path = array_slide(tmp_path / "inked.svs", inked, mpp=0.499, objective=20)
    _, tiles, _ = run_filter(path, threads=2)
    assert (tiles[["col", "row"]].to_numpy() == clean[["col", "row"]].to_numpy()).all()
    inked_tiles = ink_cover > 0.5
    assert inked_tiles.sum() >= 9
    # Tiles under the strokes: tissue by the methods, rejected as artefacts by their ink.
    assert not tiles.loc[inked_tiles, "keep"].any()
    assert tiles.loc[inked_tiles & clean["keep"].to_numpy(), "artefact"].all()
    assert (tiles.loc[inked_tiles, "ink_fraction"] > 0.3).all()
    # Clean tissue tiles (no ink at all) are kept as before.
    untouched = (ink_cover == 0) & clean["keep"].to_numpy()
    assert untouched.sum() >= 20 and tiles.loc[untouched, "keep"].all()
    # Each ink colour on its own is caught too.
    for colour in ((30, 140, 80), (30, 60, 170), (35, 35, 40)):
        tile = rgb[1000:1224, 900:1124]
        ink = (tile.astype(np.uint16) * np.array(colour) // 255).astype(np.uint8)
        assert artefact_fractions(ink)[1] > 0.5, colour
        assert artefact_fractions(tile)[1] < 0.1


def test_ihc_and_other_he_tissue_kept(tmp_path):
    # Real Ki67 IHC (DAB-brown and haematoxylin-blue nuclei) and a real H&E crop from another
    # scanner, read with tifffile (OpenSlide cannot open OME-TIFF): 40x, 0.2271 um/px.
    art = ArtefactParams()
    for name in ("OS-2-ndpi.ome.tif", "OS-1-detail.ome.tif"):
        rgb = tifffile.imread(shared_slide(f"real/ome-tiff/{name}"))[..., :3]
        for y in range(0, rgb.shape[0] - 447, 448):
            for x in range(0, rgb.shape[1] - 447, 448):  # 20x tiles: 448 px at 40x -> 224
                tile = cv2.resize(rgb[y:y + 448, x:x + 448], (224, 224), interpolation=cv2.INTER_AREA)
                bg, ink = artefact_fractions(tile)
                assert ink < art.max_ink / 2, (name, x, y, ink)
                if bg < 0.5:
                    assert edge_density(tile) > 15, (name, x, y)
    # The whole chain on the IHC image written as a slide: tissue tiles kept, lumen/glass not.
    ihc = tifffile.imread(shared_slide("real/ome-tiff/OS-2-ndpi.ome.tif"))[..., :3]
    path = array_slide(tmp_path / "ihc.svs", ihc, mpp=0.2271, objective=40)
    _, tiles, mask = run_filter(path, mags=(20, 10))
    t20 = tiles[tiles["magnification"] == 20]
    assert len(t20) == 16 and t20["keep"].sum() >= 13
    assert (tiles["ink_fraction"] < art.max_ink / 2).all()  # brown DAB and blue haematoxylin are not ink
    # what is rejected is mostly empty: lumen or glass
    assert (tiles.loc[~tiles["keep"], "background_fraction"] > 0.6).all()
    assert mask.area_mm2 > 0.1


def test_blank_slide_is_no_tissue_not_a_crash(tmp_path):
    path = tmp_path / "blank.svs"
    write_slide(path, 1200, 1000, lambda x, y, w, h, ds: np.full((h, w, 3), GLASS, np.uint8), mpp=0.5)
    slide, tiles, mask = run_filter(path, mags=(20, 10))
    assert len(tiles) > 0 and not tiles["keep"].any() and mask.area_mm2 == 0
    assert slide_status(tiles) == "no tissue" and slide_status(tiles[:0]) == "no tiles"
    assert mask_geojson(mask) == {"type": "FeatureCollection", "features": []}
    meta = {"slide_id": "blank", "magnifications": {"20": {"target": "20x", "dz_level": 11}}}
    qc = qc_summary(meta, tiles, TissueParams(), mask)
    assert qc["status"] == "no tissue" and qc["magnifications"]["20"]["kept"] == 0
    assert qc_table([qc]).loc[0, "status"] == "no tissue"
    thumb = qc_thumbnail(Image.new("RGB", (120, 100)), tiles, 512, slide_dimensions=(1200, 1000))
    assert thumb.size[0] >= 240 and thumb.size[1] == 100 + 18  # two panels above the legend


def test_geojson_polygons_with_holes_in_level0_coordinates():
    m = np.zeros((100, 120), bool)
    m[10:60, 20:90] = True
    m[25:40, 40:60] = False  # a hole
    m[70:90, 5:25] = True    # a second piece
    mask = TissueMask(m, sx=16.0, sy=16.0, threshold=20, otsu=20, mpp=0.5)
    gj = json.loads(json.dumps(mask_geojson(mask)))
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    rings = {len(f["geometry"]["coordinates"]) for f in gj["features"]}
    assert rings == {1, 2}
    for f in gj["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tissue"
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4
            xy = np.array(ring)
            assert (xy >= 0).all() and (xy[:, 0] <= 120 * 16).all() and (xy[:, 1] <= 100 * 16).all()
    # polygon areas (outer minus holes, level-0 px^2) match the mask's, up to the half-pixel boundary
    def area(r):
        x, y = np.array(r).T
        return abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2
    total = sum(area(f["geometry"]["coordinates"][0]) - sum(area(h) for h in f["geometry"]["coordinates"][1:])
                for f in gj["features"])
    assert total == pytest.approx(m.sum() * 16 * 16, rel=0.15)
    # coverage of tile boxes
    boxes = pd.DataFrame({"x": [20 * 16, 0], "y": [10 * 16, 0], "w": [320, 160], "h": [320, 160]})
    assert mask.coverage(boxes).tolist() == [1.0, 0.0]


def test_cmu_geojson_within_slide_and_overview_bounded(cmu_small):
    slide = open_slide(cmu_small, "cmu")
    big = read_overview(slide, 16)
    small_blocks = read_overview(slide, 16, block=100)  # many small reads: same image
    assert big.rgb.shape == small_blocks.rgb.shape == (185, 139, 3)
    assert np.abs(big.rgb.astype(int) - small_blocks.rgb.astype(int)).mean() < 2
    mask = tissue_mask(big, 0.499)
    gj = mask_geojson(mask)
    assert len(gj["features"]) >= 1
    xy = np.concatenate([np.array(r) for f in gj["features"] for r in f["geometry"]["coordinates"]])
    assert (xy.min(axis=0) >= 0).all() and (xy.max(axis=0) <= slide.dimensions).all()


def test_threads_do_not_change_scores(cmu_small):
    slide = open_slide(cmu_small, "cmu")
    grid, _ = build_grid(slide, resolve_resolution(slide.properties, "cmu"), [10], 224)
    params = TissueParams(methods=("edge",))
    a = filter_tiles(grid, TileReader(cmu_small, 224), params, threads=1)
    b = filter_tiles(grid, TileReader(cmu_small, 224), params, threads=2)
    pd.testing.assert_frame_equal(a, b)


def test_combine_any_reads_every_tile_and_params_from_config():
    p = TissueParams.from_config({"methods": ["otsu"], "combine": "any", "edge_threshold": 9,
                                  "otsu": {"min_coverage": 0.5}, "artefacts": {"enabled": False},
                                  "thumbnail_size": 512})
    assert p.methods == ("otsu",) and p.edge_threshold == 9 and p.otsu.min_coverage == 0.5
    assert not p.artefacts.enabled and p.otsu.mask_mpp == 8
    with pytest.raises(ValueError):
        TissueParams(methods=("magic",))
