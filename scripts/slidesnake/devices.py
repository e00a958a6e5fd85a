"""The device a job computes on: one rule for feature extraction, training and prediction
(:func:`resolve_device`), and which GPU a job uses when a machine has several (docs/cluster.md,
"Several GPUs").

Snakemake's `gpu` resource only counts: with ``--resources gpu=N`` (profile ``local-gpu``) N GPU
jobs run at once, but nothing tells each job *which* GPU is its own, and ``"cuda"`` alone means
``cuda:0`` for all of them. So a job that asks for ``auto`` or ``cuda`` claims one of the GPUs it
can see:

* the GPUs it can see are those ``CUDA_VISIBLE_DEVICES`` lists (SLURM sets it to the GPUs it gave the
  job, renumbered from 0), else every GPU of the machine;
* with one visible GPU (a SLURM job with ``--gpus=1``, a one-GPU workstation) that GPU is ``cuda:0``;
* with several, the job takes the first free *slot*: an exclusive, non-blocking ``flock`` on
  ``<lock dir>/slidesnake-gpu-<host>-<set>-<i>.lock``, held by the job's process until it exits (the
  kernel releases it, also when the job is killed). Jobs of one Snakemake run, of two runs, and of
  two users sharing the lock directory never share a slot; ``<set>`` names the visible GPUs, so
  jobs that see different GPUs (two SLURM jobs on one node) never block each other.
  When every slot is taken (more GPU jobs than GPUs, e.g. without ``--resources gpu=N``), the job
  waits for slot ``pid % N``.

``cuda:K`` given explicitly is taken as given. The lock directory is ``$SLIDESNAKE_GPU_LOCK_DIR``,
else the system's temporary directory (node-local). Everything here takes the environment and the
GPU count as arguments, so it is tested without a GPU (tests/test_devices.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

__all__ = ["resolve_device", "visible_gpus", "claim_gpu", "choose_device"]

_HELD: dict[str, int] = {}  # lock path -> open fd, kept for the life of the process


def visible_gpus(env: Mapping[str, str], n_physical: int) -> list[str]:
    """Names of the GPUs this process may use, in CUDA's order (index i is ``cuda:i``).

    ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs, comma-separated; CUDA stops at the first invalid entry
    and ``""`` or ``-1`` hides every GPU) when set, else ``0 .. n_physical - 1``.
    """
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return [str(i) for i in range(n_physical)]
    out = []
    for item in (x.strip() for x in raw.split(",")):
        if not item or item.startswith("-"):
            break
        out.append(item)
    return out


def _lock_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("SLIDESNAKE_GPU_LOCK_DIR") or tempfile.gettempdir())


def claim_gpu(gpus: list[str], env: Mapping[str, str], *, wait: bool = True) -> int:
    """Index (into ``gpus``) of the GPU slot this process now holds; see the module docstring.

    Claiming again in the same process returns the slot it already holds.
    """
    if len(gpus) <= 1:
        return 0
    ident = hashlib.sha1(",".join(gpus).encode()).hexdigest()[:10]
    base = _lock_dir(env) / f"slidesnake-gpu-{socket.gethostname()}-{ident}"
    paths = [Path(f"{base}-{i}.lock") for i in range(len(gpus))]
    for i, path in enumerate(paths):
        if str(path) in _HELD:
            return i
    for i, path in enumerate(paths):
        if _try_lock(path, block=False):
            return i
    if not wait:
        raise BlockingIOError(f"all {len(gpus)} GPU slots ({base}-*.lock) are taken")
    i = os.getpid() % len(gpus)
    log.info("all %d GPU slots are taken; waiting for slot %d (%s)", len(gpus), i, paths[i])
    _try_lock(paths[i], block=True)
    return i


def _try_lock(path: Path, block: bool) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[str(path)] = fd
    return True


def release_all() -> None:
    """Give back every slot this process holds (tests; a job's slots go when its process exits)."""
    while _HELD:
        _, fd = _HELD.popitem()
        os.close(fd)


def choose_device(requested: str, *, cuda_available: bool, n_physical: int,
                  env: Mapping[str, str] | None = None) -> str:
    """The device string a job uses for ``requested`` ("auto", "cpu", "cuda", "cuda:K", ...).

    "auto": a GPU when CUDA is available, else "cpu". "auto" / "cuda" with several visible GPUs:
    ``cuda:<claimed slot>``; with one: ``cuda:0``. Anything else is returned as given.
    """
    env = os.environ if env is None else env
    requested = str(requested)
    if requested == "auto" and not cuda_available:
        return "cpu"
    if requested not in ("auto", "cuda"):
        return requested
    gpus = visible_gpus(env, n_physical)
    i = claim_gpu(gpus, env)
    if len(gpus) > 1:
        log.info("GPU slot %d of %d (CUDA_VISIBLE_DEVICES=%s): cuda:%d", i, len(gpus),
                 env.get("CUDA_VISIBLE_DEVICES", "unset"), i)
    return f"cuda:{i}"


def resolve_device(device="auto"):
    """``"auto"`` -> CUDA when available, else CPU; ``"auto"`` / ``"cuda"`` with several visible GPUs
    -> this job's GPU slot (:func:`choose_device`); anything else is taken as given."""
    import torch

    cuda = torch.cuda.is_available()
    return torch.device(choose_device(str(device), cuda_available=cuda,
                                      n_physical=torch.cuda.device_count() if cuda else 0))
