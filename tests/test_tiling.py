import math

import cv2
import numpy as np
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from slidesnake.slide import SlideError, open_slide, resolve_resolution
from slidesnake.tiling import (TileReader, Target, build_grid, parent_indices, parse_target, parse_targets,
                               plan_level)
from conftest import shared_slide


def _grid(path, mags, tile_size=224, **kw):
    slide = open_slide(path, "s")
    res = resolve_resolution(slide.properties, "s", path, mpp_override=kw.pop("mpp", None))
    grid, info = build_grid(slide, res, mags, tile_size, **kw)
    return slide, res, grid, info


def _reference(slide, x, y, size_l0, out):
    """Level-0 region (x, y, size_l0) composited on white and area-resized to ``out`` px."""
    x, y, size_l0 = (int(round(v)) for v in (x, y, size_l0))
    region = slide.read_region((x, y), 0, (size_l0, size_l0))
    rgb = Image.new("RGB", region.size, "white")
    rgb.paste(region, mask=region.split()[3])
    return cv2.resize(np.asarray(rgb), (out, out), interpolation=cv2.INTER_AREA)


# Every OpenSlide-readable slide in ../shared: (file, sheet mpp override, tile size). The DICOM
# fixture is 16 x 16 px and boxes.tiff 300 x 250 px, so they get tiles small enough to fit.
REAL = [
    ("real/aperio/CMU-1-Small-Region.svs", None, 224),        # Aperio JPEG, 20x base, 1 level
    ("real/aperio/tcga-cr-7395-01a-01-ts1.svs", 0.25, 224),   # Aperio JPEG 2000, no MPP: override -> 40x
    ("real/hamamatsu/test3-DAPI-2-387.ndpi", None, 224),      # NDPI, 40x base, 7 levels
    ("fixtures/openslide-python/boxes_0.dcm", None, 4),       # DICOM (opened by file), 20x
    ("fixtures/openslide-python/boxes.tiff", 0.5, 32),        # generic TIFF, junk 352 um/px tag
]


@pytest.mark.parametrize("rel,mpp,tile", REAL, ids=[r[0].rsplit("/", 1)[-1] for r in REAL])
def test_tile_physical_size_and_level_on_real_slides(rel, mpp, tile):
    slide, res, grid, info = _grid(shared_slide(rel), [5, 10, 20], tile, mpp=mpp)
    top = DeepZoomGenerator(slide, tile, 0).level_count - 1
    reader = TileReader(shared_slide(rel), tile)
    for mag in (5, 10, 20):
        g = grid[grid["magnification"] == mag]
        plan = info[f"{mag}"]
        assert len(g) == plan["n_tiles"] > 0
        # Level: the finest DeepZoom level at or below the target, i.e. downsample 2**floor(log2(base/m)).
        d = res.objective_power / mag
        assert plan["dz_downsample"] == 2 ** math.floor(math.log2(d) + 1e-9)
        assert plan["dz_level"] == top - int(math.log2(plan["dz_downsample"]))
        # Physical size: every tile covers tile * base/m level-0 pixels, in microns via the MPP.
        expected_um = tile * d * res.mpp
        assert np.allclose(g["w"] * res.mpp, expected_um, rtol=0.01)
        assert np.allclose(g["h"] * res.mpp_y, tile * d * res.mpp_y, rtol=0.01)
        assert plan["tile_um"] == pytest.approx(expected_um)
        # ... and what is read is that area: compare with the level-0 region, resized.
        for t in g.iloc[[0, len(g) // 2, -1]].itertuples():
            img = reader.read(t.dz_tile_size, t.dz_level, t.col, t.row)
            assert img.shape == (tile, tile, 3)
            ref = _reference(slide, t.x, t.y, t.w, tile)
            assert np.abs(img.astype(int) - ref.astype(int)).mean() < 8, (mag, t.col, t.row)


def test_pixel_size_targets_give_microns_on_any_scanner():
    # 0.5 um/px on a 40x NDPI (0.228 um/px) and on a 20x Aperio (0.499 um/px): 112 um tiles on both.
    plans = {}
    for rel in ("real/hamamatsu/test3-DAPI-2-387.ndpi", "real/aperio/CMU-1-Small-Region.svs"):
        slide, res, grid, info = _grid(shared_slide(rel), ["0.5um", "2 um"])
        plans[rel.rsplit(".", 1)[-1]] = info["20"]
        assert set(grid["magnification"]) == {20.0, 5.0}  # named by 10 / mpp
        for key, um in (("20", 0.5), ("5", 2.0)):
            assert info[key]["target"] == f"{um:g}um" and info[key]["target_mpp"] == um
            assert info[key]["tile_um"] == pytest.approx(224 * um)
            g = grid[grid["magnification"] == float(key)]
            assert np.allclose(g["w"] * res.mpp, 224 * um, rtol=0.01)
    # NDPI: 0.5 um is 2.19x level 0, read from the 2x DeepZoom level as 245 px tiles resized to 224;
    # Aperio: 1.002x, the top level, 224 px.
    assert (plans["ndpi"]["dz_downsample"], plans["ndpi"]["dz_tile_size"]) == (2, 245)
    assert (plans["svs"]["dz_downsample"], plans["svs"]["dz_tile_size"]) == (1, 224)


def test_parse_targets():
    assert parse_target(20) == Target(20.0) and parse_target("10x") == Target(10.0)
    assert parse_target("0.25um") == Target(40.0, mpp=0.25)
    assert parse_target(" 1 µm") == Target(10.0, mpp=1.0)
    for bad in ("abc", "0um", "20 mm", -5, True):
        with pytest.raises(ValueError):
            parse_target(bad)
    with pytest.raises(ValueError, match="both name magnification 20x"):
        parse_targets([20, "0.5um"])


def test_overlap_tiles_cover_the_same_area_at_edges(cmu_small):
    # DeepZoom's first row/column has no left/top overlap: those tiles must be padded, not stretched.
    for mag, ov in ((20, 16), (15, 16)):  # 15x: 299 px DeepZoom tiles with a scaled 21 px overlap
        slide, res, grid, info = _grid(cmu_small, [mag], overlap=ov)
        reader = TileReader(cmu_small, 224, overlap=ov)
        d = info[f"{mag}"]["downsample"]
        out = 224 + 2 * ov
        last = grid[(grid["col"] == grid["col"].max()) & (grid["row"] == grid["row"].max())]
        corner = grid[(grid["col"] == 0) & (grid["row"] == 0)]
        edge = grid[(grid["col"] == 0) & (grid["row"] == 3)]
        inner = grid[(grid["col"] == 3) & (grid["row"] == 5)]
        for t in pd_rows(corner, edge, inner, last):
            img = reader.read(t.dz_tile_size, t.dz_level, t.col, t.row)
            assert img.shape == (out, out, 3)
            ref = _reference(slide, t.x - ov * d, t.y - ov * d, out * d, out)
            assert np.abs(img.astype(int) - ref.astype(int)).mean() < 4, (mag, t.col, t.row)
        assert reader.native_size(info[f"{mag}"]["dz_tile_size"]) == info[f"{mag}"]["dz_tile_size"] + 2 * info[f"{mag}"]["dz_overlap"]


def pd_rows(*frames):
    for f in frames:
        yield from f.itertuples()


def test_level0_coords_equal_deepzoom_coordinates(cmu_small):
    slide, _, grid, _ = _grid(cmu_small, [20, 10, 5])
    for t in grid.sample(20, random_state=0).itertuples():
        dz = DeepZoomGenerator(slide, t.dz_tile_size, 0)
        (x, y), _, _ = dz.get_tile_coordinates(t.dz_level, (t.col, t.row))
        assert (x, y) == (t.x, t.y)
        assert dz.get_tile_dimensions(t.dz_level, (t.col, t.row)) == (t.dz_tile_size,) * 2
    assert grid["tile_id"].tolist() == list(range(len(grid)))


def test_non_power_of_two_magnification_reads_finer_level_and_resizes(cmu_small):
    slide, res, grid, info = _grid(cmu_small, [15])
    plan = info["15"]
    assert plan["dz_tile_size"] == round(224 * 20 / 15) and plan["dz_downsample"] == 1
    t = grid.iloc[0]
    tile = TileReader(cmu_small, 224).read(t.dz_tile_size, t.dz_level, t.col, t.row)
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8


def test_upsampling_refused_unless_allowed_and_then_recorded(cmu_small):
    with pytest.raises(SlideError, match="allow_upsample"):
        plan_level(14, 20, 40, 224)
    plan = plan_level(14, 20, 40, 224, allow_upsample=True)
    assert plan.upsampled and plan.dz_tile_size == 112 and plan.dz_level == 13
    with pytest.raises(SlideError, match="finer than the slide's"):
        _grid(cmu_small, ["0.25um"])
    _, _, grid, info = _grid(cmu_small, [40], allow_upsample=True)
    assert info["40"]["upsampled"] and info["40"]["downsample"] == pytest.approx(0.5) and len(grid)


def test_tcga_without_mpp_tiles_with_override():
    path = shared_slide("real/aperio/tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(SlideError, match="'mpp' column"):
        _grid(path, [20])
    _, res, grid, info = _grid(path, [10], mpp=0.5)
    assert res.objective_power == 20 and info["10"]["dz_downsample"] == 2 and len(grid) > 0


def test_parent_columns(cmu_small):
    _, _, grid, _ = _grid(cmu_small, [20, 10, 5])
    assert {"parent_5x", "parent_10x"} <= set(grid.columns) and "parent_20x" not in grid.columns
    by_id = grid.set_index("tile_id")
    for coarse, col in ((5, "parent_5x"), (10, "parent_10x")):
        assert (grid.loc[grid["magnification"] <= coarse, col] == -1).all()
        fine = grid[grid["magnification"] > coarse]
        cx, cy = fine["x"] + fine["w"] / 2, fine["y"] + fine["h"] / 2
        has = fine[col].to_numpy() >= 0
        assert has.sum() > 0
        p = by_id.loc[fine[col].to_numpy()[has]]
        assert (p["magnification"] == coarse).all()
        assert ((p["x"].to_numpy() <= cx[has]) & (cx[has] < p["x"].to_numpy() + p["w"].to_numpy())).all()
        assert ((p["y"].to_numpy() <= cy[has]) & (cy[has] < p["y"].to_numpy() + p["h"].to_numpy())).all()
        # no parent only where the centre lies in a dropped partial coarse tile (right or bottom edge)
        c = grid[grid["magnification"] == coarse]
        right, bottom = (c["x"] + c["w"]).max(), (c["y"] + c["h"]).max()
        assert ((cx[~has] >= right) | (cy[~has] >= bottom)).all()


def test_parent_indices_lattice_and_sweep_agree():
    rng = np.random.default_rng(0)
    fine = rng.integers(0, 5000, (500, 2))
    coarse = np.array([(x, y) for y in range(0, 4000, 896) for x in range(0, 4000, 896)])[rng.permutation(25)]
    wh = np.full_like(coarse, 896)
    lattice = parent_indices(fine, np.full_like(fine, 10), coarse, wh)
    shifted = coarse + np.r_[[[1, 0]], np.zeros((24, 2), int)]  # off the lattice: the sweep decides
    sweep = parent_indices(fine, np.full_like(fine, 10), shifted, wh)
    differs = (lattice != sweep)
    assert differs.sum() <= 5 and (lattice >= 0).sum() > 300
