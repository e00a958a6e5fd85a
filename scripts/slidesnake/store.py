"""The per-slide Zarr v3 feature store: writer and reader.

Layout (see docs/design.md, "Feature store")::

    <slide_id>.zarr/          attrs: slide_id, backbone, weights, ... , magnifications
      20x/                    attrs: magnification, n_tiles
        features  (N, D)      float16 by default
        coords    (N, 2)      int64 level-0 x, y
        size      (N, 2)      int64 level-0 w, h
        grid      (N, 2)      int32 DeepZoom col, row
        tile_id   (N,)        int64 row in tiles.parquet
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import zarr

from slidesnake.io import atomic_path

SCHEMA_VERSION = 1
ARRAYS = ("features", "coords", "size", "grid", "tile_id")
_DTYPES = {"coords": "int64", "size": "int64", "grid": "int32", "tile_id": "int64"}


def mag_key(magnification: float) -> str:
    """Group name of a magnification: 20.0 -> '20x', 2.5 -> '2.5x'."""
    return f"{float(magnification):g}x"


def write_store(
    path: str | os.PathLike,
    attrs: Mapping,
    groups: Mapping[float, Mapping[str, np.ndarray]],
    feature_dtype: str = "float16",
    chunk_rows: int = 4096,
) -> None:
    """Write a complete store atomically. ``groups`` maps magnification -> arrays named in ARRAYS."""
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update(
            {**dict(attrs), "schema_version": SCHEMA_VERSION,
             "magnifications": [float(m) for m in groups]}
        )
        for mag, arrays in groups.items():
            g = root.create_group(mag_key(mag))
            n = int(len(arrays["features"]))
            g.attrs.update({"magnification": float(mag), "n_tiles": n})
            for name in ARRAYS:
                a = np.asarray(arrays[name], dtype=feature_dtype if name == "features" else _DTYPES[name])
                chunks = (max(1, min(max(n, 1), chunk_rows)),) + a.shape[1:]
                g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=chunks)[...] = a


class StoreWriter:
    """Write a store incrementally (rows of features arrive batch by batch), then rename into place.

    Usage::

        with StoreWriter(path, attrs, {20.0: n20}, dim) as w:
            w.write(20.0, start, feats)          # any order of row blocks
            w.set(20.0, "coords", coords)        # the other arrays in one go
    """

    def __init__(self, path, attrs: Mapping, n_tiles: Mapping[float, int], feature_dim: int,
                 feature_dtype: str = "float16", chunk_rows: int = 4096):
        self._path = Path(path)
        self._attrs = dict(attrs)
        self._n = {float(m): int(n) for m, n in n_tiles.items()}
        self._dim = int(feature_dim)
        self._dtype = feature_dtype
        self._chunk_rows = chunk_rows
        self._ctx = None
        self.root = None

    def __enter__(self):
        self._ctx = atomic_path(self._path)
        tmp = self._ctx.__enter__()
        self.root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        self.root.attrs.update({**self._attrs, "schema_version": SCHEMA_VERSION,
                                "magnifications": list(self._n)})
        for mag, n in self._n.items():
            g = self.root.create_group(mag_key(mag))
            g.attrs.update({"magnification": mag, "n_tiles": n})
            rows = max(1, min(max(n, 1), self._chunk_rows))
            g.create_array("features", shape=(n, self._dim), dtype=self._dtype, chunks=(rows, self._dim))
            for name, width in (("coords", 2), ("size", 2), ("grid", 2), ("tile_id", None)):
                shape = (n, width) if width else (n,)
                g.create_array(name, shape=shape, dtype=_DTYPES[name], chunks=(rows,) + shape[1:])
        return self

    def write(self, mag: float, start: int, features: np.ndarray) -> None:
        self.root[mag_key(mag)]["features"][start:start + len(features)] = features.astype(self._dtype)

    def set(self, mag: float, name: str, values: np.ndarray) -> None:
        self.root[mag_key(mag)][name][...] = np.asarray(values, dtype=_DTYPES[name])

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@dataclass
class FeatureStore:
    """Read-only view of a slide's feature store."""

    path: Path
    root: zarr.Group

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def magnifications(self) -> list[float]:
        return [float(m) for m in self.root.attrs["magnifications"]]

    def _get(self, mag: float | None, name: str) -> np.ndarray:
        if mag is None:
            mags = self.magnifications
            if len(mags) != 1:
                raise ValueError(f"{self.path}: store has magnifications {mags}; pass one")
            mag = mags[0]
        return self.root[mag_key(mag)][name][...]

    def features(self, mag: float | None = None) -> np.ndarray:
        return self._get(mag, "features").astype(np.float32)

    def coords(self, mag: float | None = None) -> np.ndarray:
        return self._get(mag, "coords")

    def size(self, mag: float | None = None) -> np.ndarray:
        return self._get(mag, "size")

    def grid(self, mag: float | None = None) -> np.ndarray:
        return self._get(mag, "grid")

    def tile_ids(self, mag: float | None = None) -> np.ndarray:
        return self._get(mag, "tile_id")

    def n_tiles(self, mag: float | None = None) -> int:
        return int(self._get(mag, "tile_id").shape[0])


def open_store(path: str | os.PathLike) -> FeatureStore:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"feature store not found: {path}")
    return FeatureStore(path=path, root=zarr.open_group(str(path), mode="r"))
