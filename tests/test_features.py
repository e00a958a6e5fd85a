"""Feature extraction on a real slide (CMU-1-Small-Region) into the Zarr store, on CPU."""

import json
import logging
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from slidesnake import features
from slidesnake.backbones import create_backbone
from slidesnake.features import (TileDataset, extract_slide, loader_options, open_store,
                                 resolve_batch_size, resolve_num_workers, tile_batches)
from slidesnake.tiling import parent_indices

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

    # 15x tiles are read at their DeepZoom size (299) and resized on the device, batched.
    first15 = ordered[(ordered.magnification == 15.0) & ordered.keep].iloc[0]
    native = TileDataset(cmu_small, first15.to_frame().T, TILE)[0]
    assert native.shape == (3, 299, 299)
    img = F.interpolate(native[None].float(), size=(224, 224), mode="bilinear", antialias=True) / 255
    x = (img - torch.tensor(bb.mean).view(3, 1, 1)) / torch.tensor(bb.std).view(3, 1, 1)
    with torch.inference_mode():
        ref = bb.model(x).numpy()[0]
    np.testing.assert_allclose(store.features(15.0)[0], ref, rtol=2e-3, atol=2e-3)
    assert store.root["15x"].attrs["dz_tile_size"] == 299 and store.root["20x"].attrs["dz_tile_size"] == 224
    assert store.root["20x"].attrs["mpp"] == pytest.approx(0.499)

    # Parent rows across magnifications, written with the store.
    for fine, coarse in ((15.0, 5.0), (20.0, 5.0), (20.0, 15.0)):
        assert f"parent_{coarse:g}x" in store.root[f"{fine:g}x"]
        np.testing.assert_array_equal(store.parents(fine, coarse), parent_indices(
            store.coords(fine), store.size(fine), store.coords(coarse), store.size(coarse)))
    assert (store.parents(20.0, 5.0) == -1).all()  # no 5x tile kept
    assert (store.parents(20.0, 15.0) >= 0).sum() == 3  # the two 15x tiles hold 3 kept 20x centres

    # Other batch size, with worker processes (each opening its own slide handle), and Zarr chunks
    # of 3 rows (so rows are written chunk by chunk across batches): same features.
    monkeypatch.setattr(features, "CHUNK_ROWS", 3)
    _run(cmu_small, tiles, tmp_path / "b.zarr", batch_size=3, num_workers=2)
    other = open_store(tmp_path / "b.zarr")
    assert other.root["20x"]["features"].chunks == (3, 256)
    for mag in (15.0, 20.0):
        np.testing.assert_allclose(other.features(mag), store.features(mag), rtol=2e-3, atol=2e-3)


def test_failed_extraction_leaves_nothing(tmp_path, cmu_small, tiles, monkeypatch):
    read = TileDataset._read_into

    def flaky(self, out, i):
        if i == 5:
            raise OSError("simulated read error")
        return read(self, out, i)

    monkeypatch.setattr(TileDataset, "_read_into", flaky)
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
    (tmp_path / "qc.json").write_text(json.dumps({"slide_id": "S1", "status": "ok"}))
    sm = SimpleNamespace(
        input=SimpleNamespace(slide=str(cmu_small), tiles=str(tmp_path / "tiles.parquet"),
                              meta=str(tmp_path / "slide.json"), qc=str(tmp_path / "qc.json")),
        output=SimpleNamespace(store=str(tmp_path / "out" / "S1.zarr")),
        params=SimpleNamespace(backbone="resnet18_trunc", weights="none", batch_size=8, num_workers=0,
                               device="auto", feature_dtype="float32"),
        log=[str(tmp_path / "log.txt")], threads=1,
        config={"on_bad_slide": "fail", "features": {"batch_size": 8, "num_workers": 0, "device": "auto",
                                                     "compile": False}})
    runpy.run_path(str(REPO / "scripts" / "extract_features.py"), init_globals={"snakemake": sm})
    store = open_store(tmp_path / "out" / "S1.zarr")
    assert store.attrs["slide_id"] == "S1" and store.attrs["objective_power"] == 20.0
    assert store.attrs["mpp_source"] == "openslide.mpp-x"
    assert store.root["15x"]["features"].dtype == np.float32 and store.n_tiles(15.0) == 2
    assert "2/2 tiles (100%)" in (tmp_path / "log.txt").read_text()


def test_cuda_branches_on_cpu(tmp_path, cmu_small, tiles, monkeypatch):
    """The CUDA path's bf16 autocast, channels-last and torch.compile (with partial batches padded
    to one shape) run on CPU and give the float32 features within bf16 tolerance."""
    compiled = []

    def fake_compile(model, **kw):  # records the call; checks that every input has one shape
        compiled.append(kw)

        def run(x):
            assert x.shape == (4, 3, 224, 224) and x.is_contiguous(memory_format=torch.channels_last)
            return model(x)
        return run

    monkeypatch.setattr(features.torch, "compile", fake_compile)
    only15 = tiles.assign(keep=tiles.magnification != 5.0)
    ref = _run(cmu_small, only15, tmp_path / "fp32.zarr", batch_size=4, num_workers=0, channels_last=False)
    summary = _run(cmu_small, only15, tmp_path / "bf16.zarr", batch_size=4, num_workers=0,
                   precision="bfloat16", channels_last=True, compile=True)
    assert compiled == [{"dynamic": False}] and summary["precision"] == "bfloat16"
    a, b = open_store(tmp_path / "fp32.zarr"), open_store(tmp_path / "bf16.zarr")
    assert b.attrs["precision"] == "bfloat16" and b.attrs["channels_last"] and b.attrs["compiled"]
    assert a.attrs["precision"] == "float32" and not a.attrs["channels_last"]
    assert ref["n_tiles"] == 12
    for mag in (15.0, 20.0):
        x, y = a.features(mag), b.features(mag)
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cos.min() > 0.99
        np.testing.assert_allclose(y, x, rtol=0.1, atol=0.1 * np.abs(x).max())


def test_batches_are_uniform_and_follow_dataset_order():
    sizes = np.array([224] * 5 + [299] * 3 + [224] * 2)
    batches = tile_batches(sizes, 2)
    assert batches == [[0, 1], [2, 3], [4], [5, 6], [7], [8, 9]]
    assert all(len(set(sizes[b])) == 1 for b in batches)
    assert sum(batches, []) == list(range(10))
    assert tile_batches(np.array([], int), 4) == []


def test_cpu_batch_mixing_sizes_is_refused(cmu_small, tiles):
    ds = TileDataset(cmu_small, tiles.sort_values("magnification"), TILE)
    assert set(ds.sizes) == {224, 299}
    with pytest.raises(ValueError, match="one size"):
        ds.__getitems__(list(range(len(ds))))
    last = [len(ds) - 3, len(ds) - 2, len(ds) - 1]  # 20x
    batch = ds.__getitems__(last)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 224, 224, 3)
    assert torch.equal(batch[1], ds[last[1]].permute(1, 2, 0))
    threaded = TileDataset(cmu_small, tiles.sort_values("magnification"), TILE, threads=3)
    assert torch.equal(threaded.__getitems__(last), batch)  # decoded by 3 threads


def test_machine_defaults(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_batch_size("auto", cpu) == 32 and resolve_batch_size(None, cpu, 448) == 8
    assert resolve_batch_size(17, cuda) == 17
    for gib, want in ((8, 64), (24, 256), (80, 512)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda d, gib=gib: SimpleNamespace(total_memory=gib * 2**30))
        assert resolve_batch_size("auto", cuda) == want
    assert resolve_batch_size("auto", cuda, 518) == 64  # ViT-g/14-style input at 80 GiB
    assert [resolve_num_workers("auto", cpu, n) for n in (1, 2, 64)] == [0, 0, 0]
    assert [resolve_num_workers("auto", cuda, n) for n in (1, 2, 8, 64)] == [1, 1, 7, 16]
    assert resolve_num_workers(3, cuda, 64) == 3
    assert loader_options(cuda, 4) == {"num_workers": 4, "pin_memory": True,
                                       "persistent_workers": False, "prefetch_factor": 4}
    assert loader_options(cpu, 0) == {"num_workers": 0, "pin_memory": False,
                                      "persistent_workers": False, "prefetch_factor": None}


KILLED = """
import logging, sys, time
import pandas as pd
from slidesnake import features
read = features.TileDataset._read_into
features.TileDataset._read_into = lambda self, out, i: (time.sleep(0.3), read(self, out, i))  # slow
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
features.extract_slide(sys.argv[1], pd.read_parquet(sys.argv[2]), sys.argv[3], slide_id="S",
                       backbone="resnet18_trunc", tile_size=224, batch_size=1, num_workers=1,
                       device="cpu", threads=1)
"""


def test_killed_extraction_leaves_no_store(tmp_path, cmu_small, tiles):
    """SIGKILL mid-extraction (no handler can run): the final path does not exist, so Snakemake
    reruns the job; the rerun removes the stale temporary and writes the same store as an
    uninterrupted run."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    with openslide.OpenSlide(str(cmu_small)) as slide:  # 15 20x tiles and 2 5x tiles
        dz = DeepZoomGenerator(slide, tile_size=TILE, overlap=0, limit_bounds=True)
        top = dz.level_count - 1
        rows = (_grid(dz, 20.0, top, TILE, [(c, r) for r in range(2, 5) for c in range(5)], True)
                + _grid(dz, 5.0, top - 2, TILE, [(0, 0), (1, 0)], True))
    many = pd.DataFrame(rows).assign(tile_id=lambda d: np.arange(len(d)))
    assert len(many) == 17
    many.to_parquet(tmp_path / "tiles.parquet")
    out = tmp_path / "out" / "S.zarr"

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(cmu_small), str(tmp_path / "tiles.parquet"),
                             str(out)], stderr=subprocess.PIPE, text=True, env=env)
    kw = dict(slide_id="S", device="cpu", batch_size=8, num_workers=0, threads=2, **COMMON)
    try:
        extract_slide(cmu_small, many, tmp_path / "ref" / "S.zarr", **kw)  # while it starts up
        for line in proc.stderr:
            if "tiles (" in line:  # first progress line: the store is half written
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "extraction ended before it could be killed"
    assert not out.exists()
    stale = [p.name for p in out.parent.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(".tmp-") and stale[0].endswith("S.zarr")

    extract_slide(cmu_small, many, out, **kw)
    assert [p.name for p in out.parent.iterdir()] == ["S.zarr"]
    got, ref = open_store(out), open_store(tmp_path / "ref" / "S.zarr")
    assert got.attrs == ref.attrs and got.n_tiles(20.0) == 15 and got.n_tiles(5.0) == 2
    for mag in (5.0, 20.0):
        for name in ("features", "coords", "size", "grid", "tile_id"):
            np.testing.assert_array_equal(got.root[f"{mag:g}x"][name][...], ref.root[f"{mag:g}x"][name][...])
    np.testing.assert_array_equal(got.parents(20.0, 5.0), ref.parents(20.0, 5.0))
    assert set(got.parents(20.0, 5.0)) == {-1, 0, 1}  # the 5x tiles cover the top 20x rows only


def test_overlap_edge_tiles_are_padded_not_stretched(tmp_path):
    """tiling.overlap > 0: DeepZoom leaves the overlap out on the slide's first row and column; the
    feature reader pads that side with the background (as TileReader.read_native does), so an edge
    tile shows the same pixels at the same place as its neighbours, not a stretched copy."""
    from slidesnake.demo import make_cohort
    from slidesnake.features import TileDataset
    from slidesnake.slide import open_slide, resolve_resolution
    from slidesnake.tiling import TileReader, build_grid

    sheet = make_cohort(tmp_path / "c", n_patients=1, slides_per_patient=(1, 1), size=1200, seed=2)
    path = sheet["path"].iloc[0]
    slide = open_slide(path, "s")
    grid, _ = build_grid(slide, resolve_resolution(slide.properties, "s", path), [20], 224, overlap=16)
    ds = TileDataset(path, grid, 224, overlap=16, limit_bounds=True)
    assert set(ds.sizes) == {256}
    reader = TileReader(path, 224, 16, True)
    corner = int(np.flatnonzero((grid["col"] == 0) & (grid["row"] == 0))[0])
    inner = int(np.flatnonzero((grid["col"] == 1) & (grid["row"] == 1))[0])
    for i in (corner, inner):
        got = ds[i].permute(1, 2, 0).numpy()
        want = np.asarray(reader.read_native(*grid.loc[grid.index[i], ["dz_tile_size", "dz_level", "col", "row"]]))
        assert got.shape == (256, 256, 3)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ds.__getitems__([i])[0].numpy(), want)
    # the corner tile's missing overlap is the slide's background, and its content starts at (16, 16)
    got = ds[corner].permute(1, 2, 0).numpy()
    bg = np.asarray(reader.read_native(*grid.loc[grid.index[corner], ["dz_tile_size", "dz_level", "col", "row"]]))[0, 0]
    assert (got[:16] == bg).all() and (got[:, :16] == bg).all()
    raw = slide.read_region((0, 0), 0, (240, 240)).convert("RGB")
    np.testing.assert_array_equal(got[16:, 16:], np.asarray(raw))
