"""Atomic outputs and logging helpers (the job log, a progress line) shared by every stage.

Every file or directory an output rule produces is written under a temporary name in the same
directory and renamed into place, so an interrupted job never leaves something that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import pandas as pd


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``block``-byte pieces (weights, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds.

    Works for files and directories (e.g. Zarr stores). On error the temporary is removed and
    any previous ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed earlier attempt at this output (Snakemake never runs two jobs for the
    # same output at once, so any temporary of this name is stale). Matched exactly: a glob
    # `.tmp-*-A1` would also match `.tmp-<pid>-X-A1`, the live temporary of another job's output.
    stale_name = re.compile(rf"\.tmp-\d+-{re.escape(path.name)}")
    for stale in path.parent.iterdir():
        if stale_name.fullmatch(stale.name):
            _remove(stale)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if tmp.is_dir():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            if path.exists():
                old = path.with_name(f".old-{os.getpid()}-{path.name}")
                os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
            else:
                os.replace(tmp, path)
        else:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a table by suffix (.parquet, .tsv, .csv), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".tsv":
            df.to_csv(tmp, sep="\t", index=False)
        else:
            df.to_csv(tmp, index=False)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def setup_logging(log_path: str | os.PathLike | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to the rule's log file (and stderr), one line per record, readable in SLURM logs."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    sys.excepthook = _log_uncaught
    return logging.getLogger("slidesnake")


class Progress:
    """One log line about every ``step`` share of ``total`` items (one line each, for SLURM logs):
    ``<what>: done/total <unit> (pct%), rate <unit>/s, elapsed, eta``."""

    def __init__(self, what: str, total: int, *, unit: str = "items", step: float = 0.1,
                 logger: logging.Logger | None = None):
        self.what, self.total, self.unit = what, total, unit
        self.step = max(1, math.ceil(total * step))
        self.next = self.step
        self.log = logger or logging.getLogger("slidesnake")
        self.t0 = time.perf_counter()

    def update(self, done: int) -> None:
        if done < self.next and done < self.total:
            return
        self.next = (done // self.step + 1) * self.step
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else float("nan")
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.log.info("%s: %d/%d %s (%3.0f%%), %.1f %s/s, %.0f s elapsed, eta %.0f s", self.what, done,
                      self.total, self.unit, 100 * done / max(1, self.total), rate, self.unit, dt, eta)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def _log_uncaught(exc_type, exc, tb) -> None:
    """An error a rule script does not catch goes to the job's log file too (Snakemake points the
    user there): errors whose class says ``one_line = True`` (damaged store or checkpoint, full disk,
    bad config) as their one line, anything else with its traceback."""
    log = logging.getLogger("slidesnake")
    if getattr(exc, "one_line", False):
        log.error("%s", exc)
    elif issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
    else:
        log.error("%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))


class DiskFullError(OSError):
    """Writing an output failed because its file system is full (or the file exceeds a size limit)."""

    one_line = True


@contextlib.contextmanager
def disk_full_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT / EFBIG while writing ``path`` into a one-line :class:`DiskFullError`
    naming the file, the space left and the fix."""
    import errno

    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or isinstance(e, DiskFullError):
            raise
        parent = Path(path).parent
        try:
            free = f"{shutil.disk_usage(parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        what = "file too large for this file system or process limit" if e.errno == errno.EFBIG \
            else "no space left on device"
        raise DiskFullError(e.errno, f"{what} while writing {path} ({free}); free disk space (or point "
                            "config outdir at a larger disk) and run the workflow again: finished outputs "
                            "are kept, only this job reruns") from None
