"""One feature-extraction process per bundle of slides: start-up paid once, not once per slide.

Each ``extract_features`` job is still its own Snakemake job (its own log, benchmark, output and
rerun bookkeeping), but with sharing on the job's script does not import torch or build the
backbone: it hands its slide to a *feature server* -- a process that holds the backbone, set up
once, and embeds the slides it is sent one after the other -- and waits for the answer. The first
job of a bundle starts the server; the next ones find it; it exits after ``idle_s`` seconds
without work (and with the SLURM job, whose processes SLURM ends).

* Which server: one per (scope, configuration). The scope is the SLURM job (``$SLURM_JOB_ID``: one
  bundle = one allocation) or, outside SLURM, the user and working directory; the configuration is
  everything :func:`slidesnake.features.extract_slide`'s model depends on (backbone, weights,
  device, batch size, precision, compile). The socket lives in ``slidesnake-feat-<uid>/`` (mode
  0700: the server unpickles requests, so only its user may connect) under
  ``$SLIDESNAKE_FEATSERVER_DIR``, else ``$TMPDIR``, else /tmp (node-local).
* The server runs ``python -m slidesnake.featserver`` with the same interpreter and environment as
  the job that started it (so the rule's conda env, when Snakemake uses one), and ends when the
  Snakemake process that ran that job (the bundle's) is gone.
* Jobs are served one at a time (one backbone, one GPU); a job's log lines are written into that
  job's log file; an error comes back to the job and is raised there (a ``SlideError`` as itself, so
  ``on_bad_slide: skip`` works as without the server). A server that dies leaves its socket behind:
  the next job finds nothing listening and starts a new one.

The model cache itself is :func:`slidesnake.features._model` (one configuration per process).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path

log = logging.getLogger(__name__)

MODES = ("auto", "true", "false", True, False)
# keys of extract_slide's arguments that decide the model the server holds
MODEL_KEYS = ("backbone", "weights", "device", "batch_size", "precision", "channels_last", "compile")
START_TIMEOUT_S = 300


def enabled(mode, env=None) -> bool:
    """Share one process among jobs? ``auto``: inside a SLURM job (a bundle); ``true`` / ``false``."""
    env = os.environ if env is None else env
    if mode in (True, "true"):
        return True
    if mode in (False, "false"):
        return False
    if mode == "auto":
        return bool(env.get("SLURM_JOB_ID"))
    raise ValueError(f"features.shared_process must be one of auto, true, false; got {mode!r}")


def socket_path(kwargs: dict, env=None) -> Path:
    env = os.environ if env is None else env
    scope = env.get("SLURM_JOB_ID") or f"{os.getuid()}-{os.getcwd()}"
    model = {k: kwargs.get(k) for k in MODEL_KEYS}
    digest = hashlib.sha1(json.dumps([scope, model, sys.executable], sort_keys=True, default=str)
                          .encode()).hexdigest()[:16]
    base = Path(env.get("SLIDESNAKE_FEATSERVER_DIR") or env.get("TMPDIR") or tempfile.gettempdir())
    return base / f"slidesnake-feat-{os.getuid()}" / f"{digest}.sock"


def _private_dir(path: Path) -> None:
    """The socket's directory, readable by its owner only: the server unpickles what it is sent, so
    no other user may reach the socket."""
    d = path.parent
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = d.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{d} belongs to another user; set SLIDESNAKE_FEATSERVER_DIR")
    if st.st_mode & 0o077:
        d.chmod(0o700)


def _authkey(path: Path) -> bytes:
    # a check that both ends agree on the socket; the protection is the directory's mode (0700)
    return hashlib.sha256(f"{os.getuid()}:{path}".encode()).digest()


def _connect(path: Path):
    try:
        return Client(str(path), family="AF_UNIX", authkey=_authkey(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def _start(path: Path, idle_s: float, log_path: str | None):
    """Start a server for ``path`` unless one is starting or running; return a connection to it."""
    _private_dir(path)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; the others then connect
        conn = _connect(path)
        if conn is not None:
            return conn
        if path.exists():
            path.unlink()  # a dead server's socket
        out = open(f"{path}.log", "a")
        # the server also ends with the Snakemake process running this job (the bundle's)
        subprocess.Popen([sys.executable, "-m", "slidesnake.featserver", str(path), "--idle-s", str(idle_s),
                          "--watch-pid", str(os.getppid())],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        out.close()
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT_S:
            conn = _connect(path)
            if conn is not None:
                return conn
            time.sleep(0.05)
    raise RuntimeError(f"feature server did not start within {START_TIMEOUT_S} s; see {path}.log")


def extract(kwargs: dict, *, log_path: str | None = None, idle_s: float | None = None) -> dict:
    """Run ``slidesnake.features.extract_job(**kwargs)`` in this bundle's feature server.

    ``idle_s`` (default ``$SLIDESNAKE_FEATSERVER_IDLE_S``, else 120): how long a server this call
    starts waits for the next slide before it exits.
    """
    if idle_s is None:
        idle_s = float(os.environ.get("SLIDESNAKE_FEATSERVER_IDLE_S", 120))
    path = socket_path(kwargs)
    if log_path:
        _append_mode(log_path)
    conn = _connect(path) or _start(path, idle_s, log_path)
    try:
        with conn:
            conn.send({"kwargs": kwargs, "log": log_path, "pid": os.getpid()})
            reply = conn.recv()
    except (EOFError, ConnectionResetError, BrokenPipeError) as err:
        raise RuntimeError(f"the feature server went away while embedding slide {kwargs.get('slide_id')!r} "
                           f"({type(err).__name__}; out of memory?): see {path}.log; rerun the workflow, or "
                           "set features.shared_process: false") from err
    if reply["ok"]:
        return reply["summary"]
    if reply.get("slide_error"):
        from slidesnake.errors import SlideError

        raise SlideError(*reply["slide_error"])
    raise RuntimeError(f"feature server: {reply['error']}\n{reply.get('traceback', '')}")


def _append_mode(log_path: str) -> None:
    """Reopen this process's handlers of ``log_path`` in append mode, so that they and the server
    (which appends the job's lines to the same file) never write over each other's lines."""
    target = os.path.abspath(log_path)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and h.baseFilename == target and h.mode != "a":
            h.acquire()
            try:
                if h.stream is not None:
                    h.stream.flush()
                    h.stream.close()
                h.stream, h.mode = None, "a"  # reopened (O_APPEND) on the next record
            finally:
                h.release()


def _alive(pid: int | None) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(path: Path, idle_s: float, watch_pid: int | None = None) -> None:
    """Serve extraction requests on ``path`` until ``idle_s`` seconds pass without one, or the process
    ``watch_pid`` (the Snakemake process of the bundle) is gone."""
    from slidesnake.features import extract_job  # torch and the rest: once per server
    from slidesnake.errors import SlideError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a deep backlog: jobs that arrive while a slide is embedded wait in line, never refused
    listener = Listener(str(path), family="AF_UNIX", backlog=128, authkey=_authkey(path))
    listener._listener._socket.settimeout(min(idle_s, 2.0))
    log.info("feature server %s: pid %d, listening", path, os.getpid())
    served, last = 0, time.monotonic()
    try:
        while True:
            try:
                conn = listener.accept()
            except TimeoutError:  # (socket.timeout) check the clock and the bundle's process
                if time.monotonic() - last >= idle_s or not _alive(watch_pid):
                    break
                continue
            with conn:
                request = conn.recv()
                handler = None
                if request.get("log"):
                    handler = logging.FileHandler(request["log"])
                    handler.setFormatter(logging.Formatter(
                        "%(asctime)s %(levelname)s %(name)s [feature server pid %(process)d]: %(message)s"))
                    logging.getLogger().addHandler(handler)
                try:
                    summary = extract_job(**request["kwargs"])
                    reply = {"ok": True, "summary": summary}
                except SlideError as err:
                    reply = {"ok": False, "error": str(err),
                             "slide_error": (err.slide_id, err.path, err.problem, err.fix)}
                except Exception as err:  # noqa: BLE001  (sent back and raised in the job)
                    reply = {"ok": False, "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()}
                finally:
                    if handler is not None:
                        logging.getLogger().removeHandler(handler)
                        handler.close()
                served += 1
                last = time.monotonic()
                try:
                    conn.send(reply)
                except (BrokenPipeError, ConnectionResetError):
                    log.warning("job pid %s went away before its answer", request.get("pid"))
    finally:
        listener.close()
        log.info("feature server %s: served %d slides; exiting (idle, or the bundle ended)", path, served)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="feature server (started by extract_features jobs)")
    ap.add_argument("socket", type=Path)
    ap.add_argument("--idle-s", type=float, default=120.0)
    ap.add_argument("--watch-pid", type=int, default=None, help="exit when this process is gone")
    args = ap.parse_args(argv)
    serve(args.socket, args.idle_s, args.watch_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
