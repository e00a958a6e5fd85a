"""The per-slide Zarr v3 feature store: writer and reader.

Layout (the full schema, with an example of reading a store with plain ``zarr``, is in
docs/features.md)::

    <slide_id>.zarr/          attrs: slide_id, backbone, weights, ... , magnifications
      20x/                    attrs: magnification, n_tiles, ...
        features  (N, D)      float16 by default
        coords    (N, 2)      int64 level-0 x, y
        size      (N, 2)      int64 level-0 w, h
        grid      (N, 2)      int32 DeepZoom col, row
        tile_id   (N,)        int64 row in tiles.parquet
        parent_5x (N,)        int64 row of the 5x group's tile containing this tile's centre, -1 if
                              that tile was not kept (one array per coarser magnification)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from slidesnake.geometry import mag_label, parent_indices
from slidesnake.integrity import StoreIntegrityError, verify_store, write_manifest
from slidesnake.io import atomic_path

SCHEMA_VERSION = 3  # 2: parent_<m>x arrays; 3: integrity manifest, zstd checksums (slidesnake.integrity)
ARRAYS = ("features", "coords", "size", "grid", "tile_id")
_DTYPES = {"coords": "int64", "size": "int64", "grid": "int32", "tile_id": "int64"}
# Every array: Zstandard with its frame checksum (a damaged chunk fails to decode), and every chunk
# written, also one equal to the fill value (so an absent chunk file is a missing one).
_ARRAY_OPTIONS = {"compressors": ZstdCodec(level=0, checksum=True), "config": {"write_empty_chunks": True}}


def create_array(group: zarr.Group, name: str, **kwargs):
    """``group.create_array`` with the store's codec settings (zstd checksum, every chunk written).
    Any array added to a store must be made with it (or :meth:`StoreWriter.add_array`): the integrity
    manifest refuses an array whose chunks are not all on disk."""
    return group.create_array(name, **kwargs, **_ARRAY_OPTIONS)


_create_array = create_array


def parent_key(coarse_magnification: float) -> str:
    """Name of the array (in a finer group) of parent rows in the ``coarse_magnification`` group."""
    return f"parent_{mag_label(coarse_magnification)}"


def _write_parents(root: zarr.Group, mags) -> None:
    """In every group, ``parent_<c>x`` for every coarser magnification ``c`` of the store, from the
    groups' level-0 coords and size (:func:`slidesnake.geometry.parent_indices`)."""

    mags = sorted(float(m) for m in mags)
    boxes = {m: (root[mag_label(m)]["coords"][...], root[mag_label(m)]["size"][...]) for m in mags}
    for i, coarse in enumerate(mags):
        for fine in mags[i + 1:]:
            parents = parent_indices(*boxes[fine], *boxes[coarse])
            g = root[mag_label(fine)]
            chunks = g["tile_id"].chunks
            _create_array(g, parent_key(coarse), shape=parents.shape, dtype="int64",
                          chunks=chunks, overwrite=True)[...] = parents


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
            g = root.create_group(mag_label(mag))
            n = int(len(arrays["features"]))
            g.attrs.update({"magnification": float(mag), "n_tiles": n})
            for name in ARRAYS:
                a = np.asarray(arrays[name], dtype=feature_dtype if name == "features" else _DTYPES[name])
                chunks = (max(1, min(max(n, 1), chunk_rows)),) + a.shape[1:]
                _create_array(g, name, shape=a.shape, dtype=a.dtype, chunks=chunks)[...] = a
        _write_parents(root, groups)
        write_manifest(root, tmp)  # last: a store without it never validates


def write_excluded_store(path: str | os.PathLike, slide_id: str, excluded: Mapping,
                         attrs: Mapping | None = None) -> None:
    """A store marking its slide as excluded (config ``on_bad_slide: skip``): attributes ``slide_id``,
    ``excluded`` (``{"stage", "reason", "fix"}``) and ``magnifications: []``; no groups, no tiles."""
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update({**dict(attrs or {}), "slide_id": slide_id, "excluded": dict(excluded),
                           "schema_version": SCHEMA_VERSION, "magnifications": []})
        write_manifest(root, tmp)


class StoreWriter:
    """Write a store incrementally (rows of features arrive batch by batch), then rename into place.

    Usage::

        with StoreWriter(path, attrs, {20.0: n20}, dim) as w:
            w.write(20.0, start, feats)          # any order of row blocks
            w.set(20.0, "coords", coords)        # the other arrays in one go
            w.group_attrs(20.0, mpp=0.5)         # extra attributes of a group

    The ``parent_<m>x`` arrays are computed from coords and size when the block succeeds, then the
    integrity manifest is recorded (:mod:`slidesnake.integrity`; anything written to ``root`` inside
    the block, attributes included, is covered), just before the store is renamed into place.
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
        self._arrays = {}  # (mag, name) -> the array as created (its write_empty_chunks setting kept)

    def __enter__(self):
        self._ctx = atomic_path(self._path)
        tmp = self._tmp = self._ctx.__enter__()
        self.root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        self.root.attrs.update({**self._attrs, "schema_version": SCHEMA_VERSION,
                                "magnifications": list(self._n)})
        for mag, n in self._n.items():
            g = self.root.create_group(mag_label(mag))
            g.attrs.update({"magnification": mag, "n_tiles": n})
            rows = max(1, min(max(n, 1), self._chunk_rows))
            self._arrays[(mag, "features")] = _create_array(g, "features", shape=(n, self._dim), dtype=self._dtype,
                                                            chunks=(rows, self._dim))
            for name, width in (("coords", 2), ("size", 2), ("grid", 2), ("tile_id", None)):
                shape = (n, width) if width else (n,)
                self._arrays[(mag, name)] = _create_array(g, name, shape=shape, dtype=_DTYPES[name],
                                                          chunks=(rows,) + shape[1:])
        return self

    def write(self, mag: float, start: int, features: np.ndarray) -> None:
        self._arrays[(float(mag), "features")][start:start + len(features)] = features.astype(self._dtype)

    def set(self, mag: float, name: str, values: np.ndarray) -> None:
        self._arrays[(float(mag), name)][...] = np.asarray(values, dtype=_DTYPES[name])

    def add_array(self, mag: float, name: str, values: np.ndarray, chunk_rows: int | None = None) -> None:
        """One more array in a magnification's group (e.g. per-round outputs), written in one go and
        covered by the integrity manifest like the others."""
        values = np.asarray(values)
        rows = max(1, min(max(len(values), 1), chunk_rows or self._chunk_rows))
        self._arrays[(float(mag), name)] = create_array(self.root[mag_label(mag)], name, shape=values.shape,
                                                        dtype=values.dtype, chunks=(rows,) + values.shape[1:])
        self._arrays[(float(mag), name)][...] = values

    def group_attrs(self, mag: float, **attrs) -> None:
        self.root[mag_label(mag)].attrs.update(attrs)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                _write_parents(self.root, self._n)
                write_manifest(self.root, self._tmp)  # last: a store without it never validates
            except BaseException as e:
                return self._ctx.__exit__(type(e), e, e.__traceback__)
        return self._ctx.__exit__(exc_type, exc, tb)


@dataclass
class FeatureStore:
    """Read-only view of a slide's feature store.

    ``damaged``: set (``root`` is then None) when :func:`open_store` found the store damaged under
    ``on_bad_slide: skip``: the store then reads as excluded, with that reason.
    """

    path: Path
    root: zarr.Group | None
    damaged: StoreIntegrityError | None = None

    @property
    def attrs(self) -> dict:
        if self.root is None:
            return {"slide_id": self.damaged.slide_id, "excluded": self.excluded, "magnifications": []}
        return dict(self.root.attrs)

    @property
    def magnifications(self) -> list[float]:
        if self.root is None:
            return []
        return [float(m) for m in self.root.attrs["magnifications"]]

    @property
    def excluded(self) -> dict | None:
        """``{"stage", "reason", "fix"}`` when the slide was excluded (``on_bad_slide: skip``; also a
        damaged store under skip), else None."""
        if self.damaged is not None:
            return {"stage": "extract_features", "reason": f"feature store damaged: {self.damaged.problem}",
                    "fix": self.damaged.fix}
        return self.root.attrs.get("excluded") or None

    def _get(self, mag: float | None, name: str) -> np.ndarray:
        if mag is None:
            mags = self.magnifications
            if len(mags) != 1:
                raise ValueError(f"{self.path}: store has magnifications {mags}; pass one")
            mag = mags[0]
        try:
            return self.root[mag_label(mag)][name][...]
        except (KeyError, ValueError, TypeError):
            raise
        except Exception as e:  # a chunk that does not decode (read without verification)
            raise StoreIntegrityError(self.attrs.get("slide_id", self.path.stem), self.path,
                                      f"{mag_label(mag)}/{name} cannot be read ({type(e).__name__}: {e})") from None

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

    def parents(self, fine_mag: float, coarse_mag: float) -> np.ndarray:
        """``(N_fine,)`` int64: for each tile of ``fine_mag``, the row in ``coarse_mag``'s arrays of
        the tile that contains its centre, -1 where that tile was not kept.

        Read from the ``parent_<coarse>x`` array; computed from coords and size for stores
        written before it existed (schema_version 1).
        """
        fine, coarse = self._mag(fine_mag), self._mag(coarse_mag)
        if not fine > coarse:
            raise ValueError(f"parents: {fine_mag:g}x must be finer than {coarse_mag:g}x")
        group = self.root[mag_label(fine)]
        if parent_key(coarse) in group:
            return group[parent_key(coarse)][...]
    
        return parent_indices(self.coords(fine), self.size(fine), self.coords(coarse), self.size(coarse))

    def _mag(self, mag: float) -> float:
        """The store's magnification equal (up to float rounding) to ``mag``."""
        for m in self.magnifications:
            if abs(m - float(mag)) <= 1e-6 * max(1.0, abs(m)):
                return m
        raise KeyError(f"{self.path}: no {float(mag):g}x group; store has {self.magnifications}")


def open_store(path: str | os.PathLike, *, verify: bool = True, on_bad_slide: str = "fail") -> FeatureStore:
    """Open a feature store read-only (see docs/features.md for its schema), after checking it
    against its integrity manifest (:func:`slidesnake.integrity.verify_store`; ``verify=False``
    skips that, for tools that inspect damaged stores).

    A damaged or unfinished store raises :class:`~slidesnake.integrity.StoreIntegrityError` (one line
    naming the slide, the store and the fix), or, with ``on_bad_slide="skip"`` (config
    ``on_bad_slide``), opens as an excluded store giving that reason (:attr:`FeatureStore.excluded`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"feature store not found: {path}")
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
    except Exception as e:
        err = StoreIntegrityError(path.stem, path, f"it cannot be opened as a Zarr group ({type(e).__name__}: {e})")
        if on_bad_slide == "skip":
            return FeatureStore(path=path, root=None, damaged=err)
        raise err from None
    if verify:
        try:
            verify_store(path, attrs)
        except StoreIntegrityError as err:
            if on_bad_slide == "skip":
                return FeatureStore(path=path, root=None, damaged=err)
            raise
    return FeatureStore(path=path, root=root)


# Root attributes that identify the encoder which wrote a store (slidesnake.backbones.Backbone.provenance);
# stores written before an attribute existed simply lack it.
ENCODER_ATTRS = ("backbone", "preset", "weights_sha256", "pooling", "feature_dim", "input_size", "mean", "std",
                 "backbone_kwargs")


def encoder_of(attrs: Mapping) -> dict:
    """The encoder identity recorded in a store's root attributes (see ENCODER_ATTRS)."""
    return {k: attrs.get(k) for k in ENCODER_ATTRS if attrs.get(k) not in (None, {})}


def _describe_encoder(enc: Mapping) -> str:
    sha = enc.get("weights_sha256")
    parts = [str(enc.get("backbone", "?")), f"weights sha256 {sha[:12]}" if sha else "random weights"]
    parts += [f"{k} {enc[k]}" for k in ("pooling", "feature_dim") if k in enc]
    return ", ".join(parts)


class MixedEncodersError(ValueError):
    """Feature stores of one training set were written by different encoders."""


def check_same_encoder(paths) -> None:
    """Refuse feature stores written by different encoders (backbone, weights, pooling, input,
    normalisation): one line naming two stores and their encoders. Stores of excluded slides
    (no features) are not compared."""
    first = None
    for p in paths:
        attrs = dict(zarr.open_group(str(p), mode="r").attrs)
        if attrs.get("excluded"):
            continue
        enc = encoder_of(attrs)
        if first is None:
            first = (p, enc)
            continue
        ref = first[1]
        diff = sorted(k for k in set(ref) | set(enc) if ref.get(k) != enc.get(k))
        if diff:
            raise MixedEncodersError(
                f"feature stores from different encoders cannot be mixed: {first[0]} ({_describe_encoder(ref)}) "
                f"and {p} ({_describe_encoder(enc)}) differ in {', '.join(diff)}; extract every slide with one "
                "features.backbone / weights (delete the stale stores to re-extract them)")
