import numpy as np
import pytest
from openslide.deepzoom import DeepZoomGenerator

from slidesnake.slide import SlideError, open_slide, resolve_resolution
from slidesnake.tiling import TileReader, build_grid, plan_level
from conftest import shared_slide


def _grid(path, mags, **kw):
    slide = open_slide(path, "s")
    res = resolve_resolution(slide.properties, "s", path, mpp_override=kw.pop("mpp", None))
    grid, info = build_grid(slide, res, mags, 224, **kw)
    return slide, res, grid, info


@pytest.mark.parametrize("rel,mags", [
    ("real/aperio/CMU-1-Small-Region.svs", [20, 10, 5]),       # 20x base
    ("real/hamamatsu/test3-DAPI-2-387.ndpi", [20, 10, 5]),     # 40x base
])
def test_tile_physical_size_matches_target_magnification(rel, mags):
    slide, res, grid, info = _grid(shared_slide(rel), mags)
    for mag in mags:
        g = grid[grid["magnification"] == mag]
        assert len(g) == info[f"{mag:g}"]["n_tiles"] > 0
        # A tile at m x covers 224 px of (10 / m) um/px nominal, i.e. 224 * base/m level-0 pixels.
        expected_um = 224 * res.objective_power / mag * res.mpp
        assert np.allclose(g["w"] * res.mpp, expected_um) and np.allclose(g["h"] * res.mpp, expected_um)
        assert info[f"{mag:g}"]["tile_um"] == pytest.approx(expected_um)
    # 20x on a 40x base is one DeepZoom level below the top, on a 20x base the top level.
    top = DeepZoomGenerator(slide, 224, 0).level_count - 1
    assert info["20"]["dz_level"] == top - (1 if res.objective_power == 40 else 0)


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


def test_upsampling_refused_unless_allowed():
    with pytest.raises(SlideError, match="allow_upsample"):
        plan_level(14, 20, 40, 224)
    plan = plan_level(14, 20, 40, 224, allow_upsample=True)
    assert plan.upsampled and plan.dz_tile_size == 112 and plan.dz_level == 13


def test_tcga_without_mpp_tiles_with_override():
    path = shared_slide("real/aperio/tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(SlideError):
        _grid(path, [20])
    _, res, grid, info = _grid(path, [10], mpp=0.5)
    assert res.objective_power == 20 and info["10"]["dz_downsample"] == 2 and len(grid) > 0


def test_reader_matches_read_region(cmu_small):
    slide, _, grid, _ = _grid(cmu_small, [20])
    t = grid.iloc[len(grid) // 2]
    tile = TileReader(cmu_small, 224).read(t.dz_tile_size, t.dz_level, t.col, t.row)
    ref = np.asarray(slide.read_region((int(t.x), int(t.y)), 0, (224, 224)).convert("RGB"))
    assert np.abs(tile.astype(int) - ref.astype(int)).mean() < 1.0


def test_parent_indices_follow_containment(cmu_small):
    from slidesnake.tiling import parent_indices

    _, _, grid, _ = _grid(cmu_small, [20, 10, 5])
    fine, coarse = grid[grid.magnification == 20], grid[grid.magnification == 5]
    coarse = coarse.sample(frac=1.0, random_state=1)  # order must not matter
    par = parent_indices(fine[["x", "y"]], fine[["w", "h"]], coarse[["x", "y"]], coarse[["w", "h"]])
    for (x, y, w, h), p in zip(fine[["x", "y", "w", "h"]].to_numpy(), par):
        cx, cy = x + w / 2, y + h / 2
        if p < 0:  # the centre lies in a dropped partial coarse tile
            assert not ((coarse.x <= cx) & (cx < coarse.x + coarse.w) & (coarse.y <= cy) & (cy < coarse.y + coarse.h)).any()
        else:
            c = coarse.iloc[p]
            assert c.x <= cx < c.x + c.w and c.y <= cy < c.y + c.h
    assert (par >= 0).sum() > 0
