import numpy as np
import pandas as pd

from slidesnake.slide import open_slide, resolve_resolution
from slidesnake.tiling import TileReader, build_grid
from slidesnake.tissue import edge_density, filter_tiles, qc_thumbnail
from conftest import shared_slide


def test_edge_density_blank_vs_texture():
    rng = np.random.default_rng(0)
    blank = np.full((224, 224, 3), 242, np.uint8)
    texture = rng.integers(60, 230, (224, 224, 3), dtype=np.uint8)
    assert edge_density(blank) < 5  # only the filter's image-border response
    assert edge_density(texture) > 15


def test_cmu_tissue_kept_and_glass_rejected(cmu_small):
    slide = open_slide(cmu_small, "cmu")
    res = resolve_resolution(slide.properties, "cmu")
    grid, _ = build_grid(slide, res, [20], 224)
    tiles = filter_tiles(grid, TileReader(cmu_small, 224), threads=2)
    assert tiles["edge_score"].notna().all() and len(tiles) == len(grid)
    # Tissue occupies the centre columns of this strip; the left and right margins are glass.
    mean_by_col = tiles.groupby("col")["keep"].mean()
    assert mean_by_col.max() > 0.7
    assert tiles["keep"].sum() >= 40
    # Mostly-white tiles (mean brightness > 230) are rejected.
    reader = TileReader(cmu_small, 224)
    bright = [reader.read(*r).mean() > 230 for r in
              tiles[["dz_tile_size", "dz_level", "col", "row"]].to_numpy()]
    assert not tiles.loc[np.array(bright), "keep"].any()
    thumb = qc_thumbnail(slide, tiles, 512)
    assert thumb.size[1] <= 512


def test_kidney_blank_glass_mostly_rejected():
    path = shared_slide("real/tiff/kidney-48-5.tif")
    slide = open_slide(path, "kidney")
    res = resolve_resolution(slide.properties, "kidney", default_mpp=0.5)
    grid, _ = build_grid(slide, res, [20], 224)
    tiles = filter_tiles(grid, TileReader(path, 224))
    assert tiles["keep"].mean() < 0.25


def test_threads_do_not_change_scores(cmu_small):
    slide = open_slide(cmu_small, "cmu")
    grid, _ = build_grid(slide, resolve_resolution(slide.properties, "cmu"), [10], 224)
    a = filter_tiles(grid, TileReader(cmu_small, 224), threads=1)
    b = filter_tiles(grid, TileReader(cmu_small, 224), threads=2)
    pd.testing.assert_frame_equal(a, b)
