"""Integrity of what the workflow writes and later reads back: feature stores and checkpoints.

Snakemake only sees a store directory's timestamp, and Zarr reads a missing chunk as its fill value
(zeros). So every feature store records what it must contain, and every reader checks it first.

**Feature stores** (:mod:`slidesnake.store`). The one store-writing path (``StoreWriter``,
``write_store``, ``write_excluded_store``) calls :func:`write_manifest` last, just before the store
is renamed into place: the root attribute ``integrity`` holds

- ``files``: every file of the store but the root ``zarr.json`` -- relative path -> ``[size, sha256]``
  (array and group metadata and every chunk; chunks are always written, also when they equal the
  fill value, so a chunk that is absent is missing);
- ``arrays``: every array -> ``{"shape", "chunks"}`` (row count and the number of chunk files);
- ``attrs_sha256``: sha256 of the other root attributes (canonical JSON), which live in the root
  ``zarr.json`` beside the manifest.

A store without it is unfinished (or older than the manifest) and never validates. :func:`verify_store`
checks all of it (every byte is hashed: the same bytes are read right after, see docs/benchmarks.md
for the cost) and raises :class:`StoreIntegrityError`, one line naming the slide, the store, what is
wrong and the fix (delete the store; the rerun rebuilds it). Chunks are also compressed with Zstandard's
frame checksum on, so a plain ``zarr`` reader of a damaged chunk gets a decode error, not wrong numbers.

**Checkpoints**: ``model.pt`` gets a sidecar ``model.pt.sha256`` (``sha256sum`` format, so
``sha256sum -c model.pt.sha256`` works in its folder), written by :func:`write_sidecar` and checked by
:func:`verify_sidecar` before a checkpoint is loaded (predict, heatmap).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping

MANIFEST_KEY = "integrity"
MANIFEST_VERSION = 1
_META = "zarr.json"


class StoreIntegrityError(ValueError):
    """A feature store that is incomplete or damaged; the message is one line naming the slide, the
    store, the problem and the fix."""

    one_line = True  # logged without traceback (slidesnake.io.setup_logging)

    def __init__(self, slide_id: str, path, problem: str):
        self.slide_id, self.path, self.problem = str(slide_id), str(path), str(problem)
        super().__init__(f"feature store of slide {self.slide_id!r} ({self.path}) is damaged: {problem}; "
                         f"{self.fix}")

    @property
    def fix(self) -> str:
        return f"delete it (rm -r {self.path}) and run the workflow again: it rebuilds the store"


class CheckpointIntegrityError(ValueError):
    """A checkpoint that does not match its sha256 sidecar, or has none."""

    one_line = True


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical_attrs(attrs: Mapping) -> bytes:
    return json.dumps({k: v for k, v in attrs.items() if k != MANIFEST_KEY}, sort_keys=True,
                      separators=(",", ":"), default=str).encode()


def _files(root: Path) -> list[str]:
    """Every file under a store (relative POSIX paths) but the root zarr.json and hidden files."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        for f in filenames:
            if f.startswith("."):
                continue
            p = (rel / f).as_posix()
            if p != _META:
                out.append(p)
    return sorted(out)


def _arrays(root: Path, files: list[str]) -> dict[str, dict]:
    """Array path -> {"shape", "chunks"} from the arrays' zarr.json, "chunks" being the chunk count of
    a regular grid."""
    arrays = {}
    for f in files:
        if not f.endswith("/" + _META):
            continue
        meta = json.loads((root / f).read_text())
        if meta.get("node_type") != "array":
            continue
        shape = [int(s) for s in meta["shape"]]
        chunk = [int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        n = math.prod(math.ceil(s / c) for s, c in zip(shape, chunk)) if all(shape) else 0
        arrays[f[: -len(_META) - 1]] = {"shape": shape, "chunks": int(n)}
    return arrays


def build_manifest(root: str | os.PathLike, attrs: Mapping) -> dict:
    """The manifest of a finished store directory (see the module docstring)."""
    root = Path(root)
    files = _files(root)
    entries = {}
    for f in files:
        data = (root / f).read_bytes()
        entries[f] = [len(data), _sha256_bytes(data)]
    arrays = _arrays(root, files)
    for array, rec in arrays.items():  # every chunk must be on disk (the writer sets write_empty_chunks)
        if _chunk_count(array, entries) != rec["chunks"]:
            raise RuntimeError(f"{root}: array {array} has {_chunk_count(array, entries)} chunk files of "
                               f"{rec['chunks']}; write it with write_empty_chunks on (slidesnake.store)")
    return {"version": MANIFEST_VERSION, "algorithm": "sha256", "attrs_sha256": _sha256_bytes(_canonical_attrs(attrs)),
            "arrays": arrays, "files": entries}


def write_manifest(group, path: str | os.PathLike) -> dict:
    """Record the manifest of an open, otherwise finished store (root group ``group`` at ``path``) in
    its attributes; call it last."""
    manifest = build_manifest(path, dict(group.attrs))
    group.attrs[MANIFEST_KEY] = manifest
    return manifest


def _chunk_count(array: str, files: Mapping) -> int:
    prefix = f"{array}/c/"
    return sum(1 for f in files if f.startswith(prefix))


def verify_store(path: str | os.PathLike, attrs: Mapping | None = None, *, full: bool = True) -> dict:
    """Check a store against its manifest; return the manifest. ``attrs``: its root attributes (read
    here when None). ``full``: hash every file (else sizes and metadata only). Raises
    :class:`StoreIntegrityError`."""
    path = Path(path)
    slide = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.name
    if attrs is None:
        try:
            attrs = json.loads((path / _META).read_text()).get("attributes", {})
        except (OSError, ValueError) as e:
            raise StoreIntegrityError(slide, path, f"its root zarr.json cannot be read ({e})") from None
    slide = str(attrs.get("slide_id") or slide)
    manifest = attrs.get(MANIFEST_KEY)
    if not isinstance(manifest, Mapping) or "files" not in manifest:
        raise StoreIntegrityError(slide, path, "it has no integrity manifest (an unfinished store, or one "
                                  "written before slidesnake recorded manifests)")
    if manifest.get("version") != MANIFEST_VERSION:
        raise StoreIntegrityError(slide, path, f"unknown integrity manifest version {manifest.get('version')!r}")
    if _sha256_bytes(_canonical_attrs(attrs)) != manifest["attrs_sha256"]:
        raise StoreIntegrityError(slide, path, "its attributes were changed after it was written")
    want: Mapping = manifest["files"]
    have = set(_files(path))
    missing = [f for f in want if f not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise StoreIntegrityError(slide, path, f"{'chunk' if '/c/' in missing[0] else 'file'} {missing[0]} "
                                  f"is missing{more}")
    extra = sorted(have - set(want))
    if extra:
        raise StoreIntegrityError(slide, path, f"unexpected file {extra[0]} (not written with the store)")
    for array, rec in manifest.get("arrays", {}).items():
        if _chunk_count(array, want) != rec["chunks"]:
            raise StoreIntegrityError(slide, path, f"array {array} should have {rec['chunks']} chunks "
                                      f"but its manifest lists {_chunk_count(array, want)}")
    for f, (size, digest) in want.items():
        p = path / f
        got = p.stat().st_size
        if got != size:
            what = "truncated" if got < size else "longer than written"
            raise StoreIntegrityError(slide, path, f"{f} is {what} ({got} of {size} bytes)")
        if full or f.endswith(_META):
            if _sha256_bytes(p.read_bytes()) != digest:
                raise StoreIntegrityError(slide, path, f"{f} was changed after it was written (sha256 differs)")
    return dict(manifest)


# ----------------------------------------------------------------------------------- checkpoints

def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.sha256")


def sidecar_line(digest: str, path: str | os.PathLike) -> str:
    """``sha256sum`` format: ``<hex>  <file name>``."""
    return f"{digest}  {Path(path).name}\n"


def read_sidecar(path: str | os.PathLike) -> str | None:
    """The sha256 recorded beside ``path`` (None when there is no sidecar)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    text = side.read_text().split()
    return text[0].lower() if text else ""


def verify_sidecar(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint, checked against its sidecar; :class:`CheckpointIntegrityError` (one line
    naming the file and the fix) when the sidecar is missing or differs."""
    from slidesnake.io import sha256_file

    fix = f"delete {Path(path).parent} and run the workflow again to retrain that fold"
    want = read_sidecar(path)
    if want is None:
        raise CheckpointIntegrityError(
            f"checkpoint {path} has no sha256 sidecar {sidecar_path(path).name} (unfinished, or written before "
            f"slidesnake recorded one); {fix} (or, if you trust the file: sha256sum {Path(path).name} > "
            f"{sidecar_path(path).name} in its folder)")
    got = sha256_file(path)
    if got != want:
        raise CheckpointIntegrityError(
            f"checkpoint {path} does not match its sha256 sidecar (damaged or changed after training: "
            f"{got[:12]}... vs {want[:12]}...); {fix}")
    return got
