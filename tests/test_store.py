"""Zarr feature store: schema round trip (incl. parent indices), reader API, plain-zarr reading."""

import json

import numpy as np
import pytest
import zarr

from slidesnake.store import SCHEMA_VERSION, StoreWriter, open_store, write_store


def nested(drop_coarse=(), drop_fine=()):
    """A 2 x 1 row of 5x tiles (level-0 side 4 * 224), each with 2 x 2 10x and 4 x 4 20x tiles."""
    groups = {}
    for mag, side in ((5.0, 896), (10.0, 448), (20.0, 224)):
        n = 2 * 896 // side
        col, row = np.meshgrid(np.arange(n), np.arange(896 // side))
        col, row = col.ravel(), row.ravel()
        groups[mag] = {"coords": np.c_[col * side, row * side], "size": np.full((len(col), 2), side),
                       "grid": np.c_[col, row], "tile_id": np.arange(len(col)) + int(mag) * 100}
    keep5 = np.ones(2, bool)
    keep5[list(drop_coarse)] = False
    keep20 = np.ones(32, bool)
    keep20[list(drop_fine)] = False
    for mag, keep in ((5.0, keep5), (20.0, keep20)):
        groups[mag] = {k: v[keep] for k, v in groups[mag].items()}
    rng = np.random.default_rng(0)
    for g in groups.values():
        g["features"] = rng.normal(size=(len(g["tile_id"]), 3)).astype(np.float32)
    return groups


def expected_parent(fine, coarse):
    """Row of the coarse tile containing each fine tile's centre, by brute force."""
    centre = fine["coords"] + fine["size"] / 2
    out = np.full(len(centre), -1)
    for i, (cx, cy) in enumerate(centre):
        lo, hi = coarse["coords"], coarse["coords"] + coarse["size"]
        hit = np.flatnonzero((lo[:, 0] <= cx) & (cx < hi[:, 0]) & (lo[:, 1] <= cy) & (cy < hi[:, 1]))
        out[i] = hit[0] if len(hit) else -1
    return out


def check_store(path, groups, dtype):
    store = open_store(path)
    assert store.attrs["schema_version"] == SCHEMA_VERSION
    assert store.magnifications == [float(m) for m in groups]
    for mag, g in groups.items():
        np.testing.assert_allclose(store.features(mag), g["features"], rtol=1e-3, atol=1e-3)
        assert store.root[f"{mag:g}x"]["features"].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(store.coords(mag), g["coords"])
        np.testing.assert_array_equal(store.size(mag), g["size"])
        np.testing.assert_array_equal(store.grid(mag), g["grid"])
        np.testing.assert_array_equal(store.tile_ids(mag), g["tile_id"])
        assert store.n_tiles(mag) == len(g["tile_id"])
    for fine, coarse in ((10.0, 5.0), (20.0, 5.0), (20.0, 10.0)):
        par = store.root[f"{fine:g}x"][f"parent_{coarse:g}x"]
        assert par.dtype == np.int64 and par.shape == (len(groups[fine]["tile_id"]),)
        np.testing.assert_array_equal(store.parents(fine, coarse), expected_parent(groups[fine], groups[coarse]))
    assert "parent_10x" not in store.root["5x"] and "parent_20x" not in store.root["10x"]
    return store


def test_write_store_round_trip_with_parents(tmp_path):
    groups = nested(drop_coarse=[1], drop_fine=[0, 5])
    write_store(tmp_path / "s.zarr", {"slide_id": "s", "mpp": 0.5}, groups)
    store = check_store(tmp_path / "s.zarr", groups, "float16")
    assert store.attrs["slide_id"] == "s" and store.attrs["mpp"] == 0.5
    # the dropped 5x tile is nobody's parent; the 20x rows shift after the dropped ones
    par = store.parents(20, 5)
    assert (par == -1).sum() == 15 and set(par) == {-1, 0}  # 16 under the dropped tile, 1 dropped
    assert (store.parents(10.0, 5.0) == [0, 0, -1, -1, 0, 0, -1, -1]).all()
    with pytest.raises(ValueError, match="finer"):
        store.parents(5.0, 20.0)
    with pytest.raises(KeyError, match="no 40x group"):
        store.parents(40.0, 5.0)


def test_store_writer_round_trip(tmp_path):
    groups = nested(drop_fine=[31])
    dims = {m: len(g["tile_id"]) for m, g in groups.items()}
    with StoreWriter(tmp_path / "w.zarr", {"slide_id": "w"}, dims, 3, "float32", chunk_rows=4) as w:
        assert not (tmp_path / "w.zarr").exists()
        for mag, g in groups.items():
            for start in range(0, dims[mag], 4):  # whole chunks, any order would do
                w.write(mag, start, g["features"][start:start + 4])
            for name in ("coords", "size", "grid", "tile_id"):
                w.set(mag, name, g[name])
            w.group_attrs(mag, mpp=0.5 * 20 / mag)
    store = check_store(tmp_path / "w.zarr", groups, "float32")
    assert store.root["20x"].attrs["mpp"] == 0.5 and store.root["20x"].attrs["n_tiles"] == 31
    assert store.root["20x"]["parent_5x"].chunks == (4,)
    assert [p.name for p in tmp_path.iterdir()] == ["w.zarr"]


def test_stores_without_parent_arrays_compute_them(tmp_path):
    groups = nested(drop_fine=[3])
    write_store(tmp_path / "old.zarr", {"slide_id": "old"}, groups)
    root = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+")
    for fine, coarse in (("10x", "5x"), ("20x", "5x"), ("20x", "10x")):
        del root[fine][f"parent_{coarse}"]
    root.attrs["schema_version"] = 1
    store = open_store(tmp_path / "old.zarr", verify=False)  # edited on purpose: fails its manifest
    assert "parent_5x" not in store.root["20x"]
    np.testing.assert_array_equal(store.parents(20.0, 5.0), expected_parent(groups[20.0], groups[5.0]))


def test_readable_with_plain_zarr(tmp_path):
    """The example of docs/features.md: no slidesnake needed to read a store."""
    groups = nested()
    write_store(tmp_path / "slide.zarr", {"slide_id": "slide", "backbone": "b"}, groups, "float32")

    # --- as in docs/features.md
    root = zarr.open_group(str(tmp_path / "slide.zarr"), mode="r")
    attrs = dict(root.attrs)
    g = root["20x"]
    features = g["features"][...]          # (N, D)
    coords = g["coords"][...]              # (N, 2) level-0 x, y
    parent = g["parent_5x"][...]           # (N,) row in root["5x"], -1: not kept
    coarse = root["5x"]["features"][...][parent[parent >= 0]]
    # ---

    assert attrs["backbone"] == "b" and attrs["magnifications"] == [5.0, 10.0, 20.0]
    assert features.shape == (32, 3) and coords.shape == (32, 2) and coarse.shape == (32, 3)
    zarr_json = json.loads((tmp_path / "slide.zarr" / "20x" / "parent_5x" / "zarr.json").read_text())
    assert zarr_json["zarr_format"] == 3 and zarr_json["data_type"] == "int64"


def test_empty_groups(tmp_path):
    groups = nested()
    groups[5.0] = {k: v[:0] for k, v in groups[5.0].items()}
    write_store(tmp_path / "e.zarr", {}, groups)
    store = open_store(tmp_path / "e.zarr")
    assert store.n_tiles(5.0) == 0 and (store.parents(20.0, 5.0) == -1).all()
    assert store.parents(5.0 * 2, 5.0).shape == (8,)
