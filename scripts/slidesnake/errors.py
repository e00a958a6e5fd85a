"""A bad slide's error, its exclusion record, and how a rule script reports either.

:class:`SlideError` is the one error a per-slide stage raises for a bad slide (its ``str`` is one
line naming the slide, its path, the problem and the fix); :func:`one_line_errors` turns it into
that one line in the job's log (``on_bad_slide: fail``) or into an exclusion record
(``on_bad_slide: skip``, :mod:`slidesnake.exclusion`). This module imports nothing of the package,
so :mod:`slidesnake.slide` and :mod:`slidesnake.exclusion` both build on it without importing
each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Iterator, Mapping


class SlideError(Exception):
    """A problem with one slide. ``str(err)`` is a single line naming the slide and the fix."""

    def __init__(self, slide_id: str, path: str | os.PathLike, problem: str, fix: str):
        self.slide_id, self.path, self.problem, self.fix = slide_id, str(path), problem, fix
        super().__init__(f"slide {slide_id!r} ({path}): {problem}; {fix}")

    def __reduce__(self):  # picklable, so errors raised in worker processes reach the parent intact
        return type(self), (self.slide_id, self.path, self.problem, self.fix)


def record(stage: str, reason: str, fix: str = "") -> dict:
    """The exclusion marker: the stage that excluded the slide, why, and what to do about it."""
    return {"stage": str(stage), "reason": str(reason), "fix": str(fix)}


def from_error(stage: str, err: SlideError) -> dict:
    return record(stage, err.problem, err.fix)


def describe(rec: Mapping) -> str:
    """``"excluded at <stage>: <reason>"``: how logs and placeholders name an exclusion."""
    return f"excluded at {rec['stage']}: {rec['reason']}"


def log_excluded(log: logging.Logger, slide_id: str, path, rec: Mapping, upstream: bool = False) -> None:
    how = "passed on from an earlier stage" if upstream else "on_bad_slide: skip"
    log.warning("slide %r (%s) %s; %s [%s]", slide_id, path, describe(rec), rec.get("fix") or "-", how)


@contextlib.contextmanager
def one_line_errors(log: logging.Logger, on_bad_slide: str = "fail", stage: str = "",
                    exclude: Callable[[dict], None] | None = None,
                    also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """For rule scripts: log a SlideError (or an exception of a type in ``also``) as its one line
    and exit 1 (no traceback in the log).

    With ``on_bad_slide="skip"`` and ``exclude``, a SlideError instead excludes the slide (config
    ``on_bad_slide``, :mod:`slidesnake.exclusion`): it is logged as a warning, ``exclude(record)``
    writes the stage's outputs marked with ``record = {"stage": stage, "reason", "fix"}``, and the
    script goes on after the ``with`` block.
    """
    try:
        yield
    except SlideError as err:
        if on_bad_slide == "skip" and exclude is not None:
            rec = from_error(stage, err)
            log_excluded(log, err.slide_id, err.path, rec)
            exclude(rec)
            return
        log.error("%s", err)
        raise SystemExit(1) from None
    except also as err:
        log.error("%s", " ".join(str(err).split()))
        raise SystemExit(1) from None
