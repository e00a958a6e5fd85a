"""Stain normalisation (slidesnake.stainnorm): references from a real slide and from the cohort's
QC, tiles moved towards the reference, provenance in the feature store, off by default."""

import numpy as np
import pandas as pd
import pytest
from conftest import shared_slide

from slidesnake.features import extract_slide
from slidesnake.stainnorm import TileNormaliser, cohort_reference, fit_reference, load_normaliser, slide_tissue_pixels
from slidesnake.store import open_store
from slidesnake.tiling import TileReader, tile_slide
from slidesnake.tissue import TissueParams, filter_tiles

CMU, OS1 = "real/aperio/CMU-1-Small-Region.svs", "real/ome-tiff/OS-1-detail.ome.tif"


def _tiles(rel, n=4):
    path = shared_slide(rel)
    grid, meta = tile_slide(path, "s", magnifications=[20], tile_size=224)
    reader = TileReader(path, 224, reader=meta["reader"])
    keep = filter_tiles(grid, reader, TissueParams(methods=("edge",)))
    keep = keep[keep["keep"]].head(n)
    return [reader.read(t.dz_tile_size, t.dz_level, t.col, t.row) for t in keep.itertuples()]


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_tiles_move_towards_the_reference(method):
    ref_px = slide_tissue_pixels(str(shared_slide(CMU)), "cmu", 0.499)
    ref = fit_reference(method, ref_px, "slide cmu")
    norm = TileNormaliser(ref)
    target = ref_px.reshape(-1, 3).astype(float).mean(axis=0)
    before = after = 0.0
    for tile in _tiles(OS1):  # another scanner's (NDPI, via OME-TIFF) H&E
        out = norm(tile)
        assert out.shape == tile.shape and out.dtype == np.uint8
        before += np.abs(tile.reshape(-1, 3).mean(axis=0) - target).sum()
        after += np.abs(out.reshape(-1, 3).mean(axis=0) - target).sum()
    assert after < before, (before, after)
    assert norm(np.full((64, 64, 3), 250, np.uint8)).shape == (64, 64, 3)  # glass: returned unchanged


def test_cohort_reference_is_the_median_of_the_qc_vectors():
    qcs = [{"stain_vectors": {"h": [0.65, 0.70, 0.29], "e": [0.07, 0.99, 0.11], "max_conc": [1.9, 1.0]}},
           {"stain_vectors": {"h": [0.60, 0.72, 0.35], "e": [0.10, 0.95, 0.20], "max_conc": [2.1, 1.2]}},
           {"stain_vectors": None}]
    ref = cohort_reference(qcs)
    he = np.array(ref["he"])
    assert ref["method"] == "macenko" and "2 slides" in ref["reference"]
    assert np.allclose(np.linalg.norm(he, axis=0), 1) and ref["max_conc"] == pytest.approx([2.0, 1.1])
    with pytest.raises(ValueError, match="reference to a slide id"):
        cohort_reference([{"stain_vectors": None}])


def test_store_records_the_normalisation(tmp_path):
    path = shared_slide(CMU)
    grid, meta = tile_slide(path, "cmu", magnifications=[20], tile_size=224)
    tiles = grid.head(6).assign(keep=True)
    ref = fit_reference("reinhard", slide_tissue_pixels(str(path), "cmu", 0.499), "slide cmu")
    (tmp_path / "ref.json").write_text(pd.Series(ref).to_json())
    norm = load_normaliser(tmp_path / "ref.json")
    kw = dict(slide_id="cmu", backbone="resnet18_trunc", tile_size=224, device="cpu", num_workers=0, batch_size=4)
    extract_slide(path, tiles, tmp_path / "plain.zarr", **kw)
    extract_slide(path, tiles, tmp_path / "norm.zarr", tile_transform=norm, **kw)
    plain, normed = open_store(tmp_path / "plain.zarr"), open_store(tmp_path / "norm.zarr")
    assert plain.attrs["stain_normalisation"] == "none"
    assert normed.attrs["stain_normalisation"]["method"] == "reinhard"
    assert normed.attrs["stain_normalisation"]["reference"] == "slide cmu"
    a, b = (np.asarray(s.features(20), np.float32) for s in (plain, normed))
    assert a.shape == b.shape and not np.allclose(a, b)
    assert load_normaliser(None) is None
