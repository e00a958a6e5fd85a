"""Node-local staging of a slide: copy it to local scratch, read the copy, remove it after.

For clusters whose slide storage is a network filesystem that answers OpenSlide's many small,
scattered reads (a tile's JPEG at a time, plus the TIFF directory walks) slowly: one sequential copy
is read at the filesystem's streaming rate, and every tile read after it is a local read.
(docs/cluster.md, "Node-local staging"; measured with scripts/bench/bench_staging.py.)

``stage_dir``: None reads in place; otherwise a directory, with environment variables expanded
(``"$TMPDIR"``, which SLURM sets to the job's scratch on many sites; unset, the system's temporary
directory). A slide made of several files (MIRAX: ``x.mrxs`` and the directory ``x/``) is copied
with its companion directory. The copy gets a name unique to the process, so two jobs staging one
slide never share a copy, and it is removed on success and on error alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def resolve_stage_dir(stage_dir: str | None, env=None) -> Path | None:
    if not stage_dir:
        return None
    env = os.environ if env is None else env
    text = str(stage_dir)
    for name in ("TMPDIR", "SLURM_TMPDIR", "SLURM_JOB_TMP"):
        text = text.replace(f"${{{name}}}", env.get(name, "")).replace(f"${name}", env.get(name, ""))
    text = os.path.expandvars(text)
    return Path(text) if text.strip() else Path(tempfile.gettempdir())


@contextlib.contextmanager
def staged(path: str | os.PathLike, stage_dir: str | None, slide_id: str = "?") -> Iterator[str]:
    """The path to read ``path`` from: itself, or a copy under ``stage_dir`` for the block's duration."""
    base = resolve_stage_dir(stage_dir)
    if base is None:
        yield str(path)
        return
    src = Path(path)
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"slidesnake-stage-{os.getpid()}-", dir=base))
    try:
        t0 = time.perf_counter()
        dst = work / src.name
        shutil.copyfile(src, dst)
        size = src.stat().st_size
        companion = src.with_suffix("")
        if src.suffix.lower() == ".mrxs" and companion.is_dir():
            shutil.copytree(companion, work / companion.name)
            size += sum(f.stat().st_size for f in companion.rglob("*") if f.is_file())
        dt = time.perf_counter() - t0
        log.info("%s: staged %s to %s (%.0f MB in %.1f s, %.0f MB/s)", slide_id, src, dst, size / 1e6, dt,
                 size / 1e6 / dt if dt > 0 else float("nan"))
        yield str(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
