"""Local weight files of an encoder: a single file, a Hugging Face model folder, or an HF cache
snapshot; their sha256 and its verification. No torch import (used while Snakemake parses).

``features.weights`` may be

* a file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``);
* a model folder as downloaded from Hugging Face (``config.json`` beside ``model.safetensors`` or
  ``pytorch_model.bin``, or shards listed by ``model.safetensors.index.json`` /
  ``pytorch_model.bin.index.json``);
* a Hugging Face cache entry ``.../hub/models--<org>--<name>`` (the snapshot ``refs/main``
  points to) or one of its ``snapshots/<revision>`` folders.

Nothing here reaches for a hub.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from slidesnake.io import sha256_file

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
GENERIC_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class WeightsError(ValueError):
    """A problem with the configured weights (missing, ambiguous, or a wrong sha256); one line."""


@dataclass(frozen=True)
class WeightFiles:
    """The files one ``features.weights`` value stands for."""

    given: Path                 # what the config named (resolved)
    files: tuple[Path, ...]     # weight files, shards in order
    config: Path | None = None  # config.json of a model folder

    @property
    def inputs(self) -> list[str]:
        """Every file the encoder reads (Snakemake inputs of extract_features)."""
        return [str(p) for p in (*self.files, *([self.config] if self.config else []))]


def _snapshot(folder: Path) -> Path:
    """The snapshot folder of an HF cache entry ``models--org--name`` (else ``folder`` itself)."""
    snaps = folder / "snapshots"
    if not snaps.is_dir():
        return folder
    ref = folder / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
        return snaps / ref.read_text().strip()
    found = sorted(p for p in snaps.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    raise WeightsError(f"{folder}: Hugging Face cache entry with {len(found)} snapshots and no refs/main; "
                       "set features.weights to one of its snapshots/<revision> folders")


def resolve_weight_files(weights: str | Path, preferred: tuple[str, ...] = ()) -> WeightFiles:
    """The weight file(s) of ``weights`` (see the module docstring); ``preferred`` are the published
    file names of the encoder, tried first in a folder."""
    given = Path(weights).expanduser()
    if given.is_file():
        if given.suffix not in WEIGHT_SUFFIXES:
            raise WeightsError(f"{given}: weights must be one of {', '.join(WEIGHT_SUFFIXES)} or a model folder")
        return WeightFiles(given.absolute(), (given.absolute(),))
    if not given.is_dir():
        raise WeightsError(f"weights file not found: {given} (features.weights: a local file or a model folder; "
                           "slidesnake never downloads weights)")
    folder = _snapshot(given)
    config = folder / "config.json"
    config = config.absolute() if config.is_file() else None  # (HF snapshot: keep the link's name)
    for index in INDEX_FILES:
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise WeightsError(f"{folder / index}: not a shard index ({e})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise WeightsError(f"{folder / index}: shard(s) {missing[:3]} not found in {folder}")
            return WeightFiles(given.resolve(), tuple((folder / s).absolute() for s in shards), config)
    for name in (*preferred, *GENERIC_FILES):
        if (folder / name).is_file():
            return WeightFiles(given.resolve(), ((folder / name).absolute(),), config)
    candidates = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return WeightFiles(given.resolve(), ((folder / candidates[0]).absolute(),), config)
    wanted = ", ".join(dict.fromkeys((*preferred, *GENERIC_FILES)))
    raise WeightsError(f"{folder}: no weights file found (looked for {wanted} or a shard index"
                       + (f"; several candidates {candidates[:5]}: name one file in features.weights" if candidates
                          else "") + ")")


_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, for this process


def file_hashes(files) -> dict[str, str]:
    """``{file name: sha256}`` of ``files`` (symlinks of an HF snapshot are followed). Hashed once
    per file version and process (a process embedding many slides hashes a 4 GB file once)."""
    out = {}
    for f in files:
        real = Path(f).resolve()
        st = real.stat()
        key = (str(real), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            _HASHES[key] = sha256_file(real)
        out[Path(f).name] = _HASHES[key]
    return out


def hub_blob_sha256(files) -> dict[str, str]:
    """``{file name: sha256}`` stated by a Hugging Face cache: a snapshot's weight file links to
    ``blobs/<sha256>``, the hub's LFS object id (the sha256 the hub page shows for the file)."""
    out = {}
    for f in files:
        f = Path(f)
        if f.is_symlink():
            target = f.resolve().name
            if re.fullmatch(r"[0-9a-f]{64}", target) and f.resolve().parent.name == "blobs":
                out[f.name] = target
    return out


def combined_sha256(hashes: dict[str, str]) -> str:
    """The sha256 of a set of weight files: the file's own for one file; for shards, the sha256 of
    the ``sha256sum``-style listing (``<sha256>  <name>\\n`` lines sorted by name)."""
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    listing = "".join(f"{h}  {n}\n" for n, h in sorted(hashes.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def verify_sha256(hashes: dict[str, str], files, expected: dict[str, str] | None = None,
                  pinned: str | dict | None = None) -> None:
    """Stop with one line naming the file and both hashes when a file's sha256 differs from the
    publisher's (``expected``: file name -> sha256, from the preset) or the run's pin
    (``features.weights_sha256``: one sha256 for the file / the set of shards, or file name -> sha256)."""
    by_name = {Path(f).name: Path(f) for f in files}
    checks = [(n, h, "the preset's published sha256") for n, h in (expected or {}).items() if n in hashes]
    checks += [(n, h, "the sha256 the Hugging Face cache names it by (blobs/<sha256>: the hub's LFS id)")
               for n, h in hub_blob_sha256(files).items()]
    if isinstance(pinned, dict):
        unknown = sorted(set(pinned) - set(hashes))
        if unknown:
            raise WeightsError(f"features.weights_sha256 names {unknown} but the weights are {sorted(hashes)}")
        checks += [(n, h, "features.weights_sha256") for n, h in pinned.items()]
    elif pinned:
        total = combined_sha256(hashes)
        if total != str(pinned).lower():
            first = next(iter(by_name.values()))
            what = first if len(hashes) == 1 else f"{len(hashes)} shards in {first.parent}"
            raise WeightsError(f"weights {what}: sha256 {total} does not match features.weights_sha256 "
                               f"{str(pinned).lower()}; the file differs from the one pinned (replace it, or "
                               "update the pin if the change is intended)")
    for name, want, source in checks:
        if hashes[name] != str(want).lower():
            raise WeightsError(f"weights {by_name[name]}: sha256 {hashes[name]} does not match {source} "
                               f"{str(want).lower()}; the file differs from the one published (re-download it, "
                               "or update the pin if the change is intended)")
