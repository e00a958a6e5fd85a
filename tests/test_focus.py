"""Blur QC: a generated slide with a known out-of-focus region, scored per tile through the real
tissue filter (filter_tiles); the veto's precision and recall are bounded here (figures in
docs/benchmarks.md, scripts/bench/bench_blur.py)."""

import numpy as np
import pytest
from conftest import shared_slide

from slidesnake.focus import blurred_demo_slide, focus_score, precision_recall
from slidesnake.tiling import TileReader, tile_slide
from slidesnake.tissue import TissueParams, filter_slide, qc_table, tile_counts


@pytest.fixture(scope="module")
def blurred(tmp_path_factory):
    path = tmp_path_factory.mktemp("blur") / "blur.svs"
    truth = blurred_demo_slide(path, 2048, 1536, sigma_um=1.0)
    grid, meta = tile_slide(path, "blur", magnifications=[20], tile_size=224)
    # default methods (edge or mask): blurred tissue has little edge density, the mask still finds it
    return truth, filter_slide(str(path), meta, grid, TissueParams(), thumbnail_size=256).tiles


def test_blur_veto_finds_the_blurred_region(blurred):
    truth, tiles = blurred
    judged = tiles[tiles["tissue"] & tiles["focus_score"].notna()]
    pr = precision_recall(judged, truth, judged["blurred"].to_numpy())
    assert pr["blurred"] >= 10 and pr["tiles"] - pr["blurred"] >= 10  # both sides are there
    assert pr["precision"] >= 0.95 and pr["recall"] >= 0.9, pr
    assert tile_counts(tiles)["20"]["blurred"] == int(tiles["blurred"].sum()) > 0
    assert not (tiles["blurred"] & tiles["keep"]).any()


def test_blur_config_section():
    params = TissueParams.from_config({"blur": {"enabled": False, "min_focus": 0.5}})
    assert (params.blur.enabled, params.blur.min_focus) == (False, 0.5)


def test_sharp_real_slides_pass():
    """Real in-focus slides (H&E, frozen H&E, Ki67 IHC) stay above the default threshold."""
    for rel, mpp in (("real/aperio/CMU-1-Small-Region.svs", None), ("real/ome-tiff/OS-2-ndpi.ome.tif", None),
                     ("real/aperio/tcga-cr-7395-01a-01-ts1.svs", 0.25)):
        path = shared_slide(rel)
        grid, meta = tile_slide(path, "s", magnifications=[20], tile_size=224, mpp=mpp)
        reader = TileReader(path, 224, reader=meta["reader"])
        idx = np.linspace(0, len(grid) - 1, min(12, len(grid))).astype(int)
        scores = [focus_score(reader.read(t.dz_tile_size, t.dz_level, t.col, t.row))
                  for t in grid.iloc[idx].itertuples()]
        scores = [s for s in scores if s == s]
        assert scores and min(scores) > TissueParams().blur.min_focus, (rel, scores)


def test_glass_is_not_judged():
    assert np.isnan(focus_score(np.full((224, 224, 3), 245, np.uint8)))


def test_qc_table_counts_blurred():
    qc = {"slide_id": "s", "status": "ok", "magnifications": {"20": {"tiles": 5, "artefact": 1, "blurred": 2,
                                                                      "kept": 2}}}
    assert qc_table([qc])["blurred_20x"].tolist() == [2]
