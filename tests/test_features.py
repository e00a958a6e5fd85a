"""Feature extraction on a real slide (CMU-1-Small-Region) into the Zarr store, on CPU."""

import json
import logging
import runpy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from slidesnake import features
from slidesnake.backbones import create_backbone
from slidesnake.features import TileDataset, extract_slide, open_store

REPO = Path(__file__).resolve().parents[1]
TILE = 224
COMMON = dict(backbone="resnet18_trunc", weights="none", tile_size=TILE, overlap=0, limit_bounds=True)


def _grid(dz, mag, level, dz_tile_size, addresses, keep):
    rows = []
    for col, row in addresses:
        (x, y), _, _ = dz.get_tile_coordinates(level, (col, row))
        w, h = dz.get_tile_dimensions(level, (col, row))
        scale = 2 ** (dz.level_count - 1 - level)
        rows.append(dict(magnification=mag, dz_tile_size=dz_tile_size, dz_level=level, col=col,
                         row=row, x=x, y=y, w=w * scale, h=h * scale, keep=keep))
    return rows


@pytest.fixture
def tiles(cmu_small):
    """20x: 10 tiles (8 kept); 15x (dz_tile_size 299, resized): 2 kept; 5x: 2 tiles, none kept."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    with openslide.OpenSlide(str(cmu_small)) as slide:
        dz224 = DeepZoomGenerator(slide, tile_size=TILE, overlap=0, limit_bounds=True)
        dz299 = DeepZoomGenerator(slide, tile_size=299, overlap=0, limit_bounds=True)
        top = dz224.level_count - 1
        rows = (_grid(dz224, 20.0, top, TILE, [(c, r) for r in (4, 5) for c in range(5)], True)
                + _grid(dz299, 15.0, top, 299, [(1, 3), (2, 3)], True)
                + _grid(dz224, 5.0, top - 2, TILE, [(0, 0), (1, 0)], False))
    df = pd.DataFrame(rows)
    df.loc[[0, 7], "keep"] = False
    df.insert(0, "tile_id", np.arange(len(df), dtype=np.int64))
    df["edge_score"] = np.float32(0.5)
    return df.sample(frac=1.0, random_state=0)  # extract_slide must order rows by tile_id itself


def _run(slide, tiles, out, **kw):
    return extract_slide(slide, tiles, out, slide_id="CMU-1-Small-Region", device="cpu",
                         extra_attrs={"mpp": np.float64(0.499), "objective_power": 20}, **COMMON, **kw)


def test_extract_slide(tmp_path, cmu_small, tiles, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="slidesnake"):
        summary = _run(cmu_small, tiles, tmp_path / "a.zarr", batch_size=4, num_workers=0, threads=2)
    assert summary["n_tiles"] == 10 and summary["n_tiles_per_magnification"] == {
        "5x": 0, "15x": 2, "20x": 8}
    assert "10/10 tiles (100%)" in caplog.text

    store = open_store(tmp_path / "a.zarr")
    attrs = store.attrs
    assert store.magnifications == [5.0, 15.0, 20.0]
    assert {k: attrs[k] for k in ("slide_id", "backbone", "weights", "weights_sha256", "feature_dim",
                                  "precision", "feature_dtype", "tile_size", "overlap", "device",
                                  "mpp", "objective_power")} == {
        "slide_id": "CMU-1-Small-Region", "backbone": "resnet18_trunc", "weights": "none",
        "weights_sha256": None, "feature_dim": 256, "precision": "float32", "feature_dtype": "float16",
        "tile_size": TILE, "overlap": 0, "device": "cpu", "mpp": 0.499, "objective_power": 20}
    assert attrs["slidesnake_version"]

    ordered = tiles.sort_values("tile_id")
    for mag in store.magnifications:
        want = ordered[(ordered.magnification == mag) & ordered.keep]
        n = len(want)
        assert store.root[f"{mag:g}x"]["features"].dtype == np.float16
        assert store.features(mag).shape == (n, 256) and store.features(mag).dtype == np.float32
        np.testing.assert_array_equal(store.coords(mag), want[["x", "y"]].to_numpy())
        np.testing.assert_array_equal(store.size(mag), want[["w", "h"]].to_numpy())
        np.testing.assert_array_equal(store.grid(mag), want[["col", "row"]].to_numpy())
        np.testing.assert_array_equal(store.tile_ids(mag), want["tile_id"].to_numpy())
        assert store.root[f"{mag:g}x"].attrs["n_tiles"] == n
    assert np.isfinite(store.features(20.0)).all() and store.features(20.0).std() > 0

    # The first 20x row is the backbone applied to that tile, normalised by hand.
    first = ordered[(ordered.magnification == 20.0) & ordered.keep].iloc[0]
    img = TileDataset(cmu_small, first.to_frame().T, TILE)[0].float() / 255
    bb = create_backbone("resnet18_trunc")
    x = (img - torch.tensor(bb.mean).view(3, 1, 1)) / torch.tensor(bb.std).view(3, 1, 1)
    with torch.inference_mode():
        ref = bb.model(x[None]).numpy()[0]
    np.testing.assert_allclose(store.features(20.0)[0], ref, rtol=2e-3, atol=2e-3)

    # Other batch size, with worker processes (each opening its own slide handle), and Zarr chunks
    # of 3 rows (so rows are written chunk by chunk across batches): same features.
    monkeypatch.setattr(features, "CHUNK_ROWS", 3)
    _run(cmu_small, tiles, tmp_path / "b.zarr", batch_size=3, num_workers=2)
    other = open_store(tmp_path / "b.zarr")
    assert other.root["20x"]["features"].chunks == (3, 256)
    for mag in (15.0, 20.0):
        np.testing.assert_allclose(other.features(mag), store.features(mag), rtol=2e-3, atol=2e-3)


def test_failed_extraction_leaves_nothing(tmp_path, cmu_small, tiles, monkeypatch):
    read = TileDataset.__getitem__

    def flaky(self, i):
        if i == 5:
            raise OSError("simulated read error")
        return read(self, i)

    monkeypatch.setattr(TileDataset, "__getitem__", flaky)
    with pytest.raises(OSError, match="simulated"):
        _run(cmu_small, tiles, tmp_path / "s.zarr", batch_size=2, num_workers=0)
    assert list(tmp_path.iterdir()) == []


def test_no_kept_tiles_writes_empty_store(tmp_path, cmu_small, tiles, caplog):
    with caplog.at_level(logging.WARNING):
        summary = _run(cmu_small, tiles.assign(keep=False), tmp_path / "e.zarr", num_workers=0)
    assert summary["n_tiles"] == 0 and "no kept tiles" in caplog.text
    store = open_store(tmp_path / "e.zarr")
    assert store.magnifications == [5.0, 15.0, 20.0]
    assert all(store.features(m).shape == (0, 256) and store.n_tiles(m) == 0
               for m in store.magnifications)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in saved[0]:
            h.close()
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_snakemake_script(tmp_path, cmu_small, tiles, restore_logging):
    tiles.assign(keep=tiles.magnification == 15.0).to_parquet(tmp_path / "tiles.parquet")
    meta = {"slide_id": "S1", "path": str(cmu_small), "mpp": 0.499, "mpp_source": "openslide.mpp-x",
            "objective_power": 20.0, "objective_source": "openslide.objective-power",
            "tile_size": TILE, "overlap": 0, "limit_bounds": True}
    (tmp_path / "slide.json").write_text(json.dumps(meta))
    sm = SimpleNamespace(
        input=SimpleNamespace(slide=str(cmu_small), tiles=str(tmp_path / "tiles.parquet"),
                              meta=str(tmp_path / "slide.json")),
        output=SimpleNamespace(store=str(tmp_path / "out" / "S1.zarr")),
        params=SimpleNamespace(backbone="resnet18_trunc", weights="none", batch_size=8, num_workers=0,
                               device="auto", feature_dtype="float32"),
        log=[str(tmp_path / "log.txt")], threads=1)
    runpy.run_path(str(REPO / "scripts" / "extract_features.py"), init_globals={"snakemake": sm})
    store = open_store(tmp_path / "out" / "S1.zarr")
    assert store.attrs["slide_id"] == "S1" and store.attrs["objective_power"] == 20.0
    assert store.attrs["mpp_source"] == "openslide.mpp-x"
    assert store.root["15x"]["features"].dtype == np.float32 and store.n_tiles(15.0) == 2
    assert "2/2 tiles (100%)" in (tmp_path / "log.txt").read_text()
