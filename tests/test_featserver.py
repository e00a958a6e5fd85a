"""A bundle's slides embedded by one feature server (slidesnake.featserver): the backbone is set up
once, every job keeps its own log and output, errors reach the job, and the server goes away when
idle. Plus node-local staging (slidesnake.staging). Real slide, real processes, CPU."""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from slidesnake.featserver import enabled, socket_path
from slidesnake.features import extract_job
from slidesnake.staging import resolve_stage_dir, staged
from slidesnake.store import open_store
from test_features import COMMON, REPO, TILE, restore_logging, tiles  # noqa: F401  (fixtures)


@pytest.fixture
def job_files(tmp_path, cmu_small, tiles):  # noqa: F811
    tiles.to_parquet(tmp_path / "tiles.parquet")
    meta = {"slide_id": "S1", "path": str(cmu_small), "mpp": 0.499, "objective_power": 20.0,
            "tile_size": TILE, "overlap": 0, "limit_bounds": True}
    (tmp_path / "slide.json").write_text(json.dumps(meta))
    (tmp_path / "qc.json").write_text(json.dumps({"slide_id": "S1", "status": "ok"}))
    return tmp_path


# Run-shaping settings are read from the config by the job script (not rule params; docs/design.md).
RUN_SETTINGS = {"batch_size": 8, "num_workers": 0, "device": "cpu", "compile": False}


def _with_run_settings(config: dict) -> dict:
    return {**config, "features": {**RUN_SETTINGS, **config.get("features", {})}}


def _script(work: Path, slide: Path, name: str, config: dict, tiles_path: Path | None = None):
    sm = SimpleNamespace(
        input=SimpleNamespace(slide=str(slide), tiles=str(tiles_path or work / "tiles.parquet"),
                              meta=str(work / "slide.json"), qc=str(work / "qc.json")),
        output=SimpleNamespace(store=str(work / "out" / f"{name}.zarr")),
        params=SimpleNamespace(backbone="resnet18_trunc", weights="none", feature_dtype="float32"),
        log=[str(work / f"{name}.log")], threads=1, config=_with_run_settings(config))
    runpy.run_path(str(REPO / "scripts" / "extract_features.py"), init_globals={"snakemake": sm})
    logging.getLogger().handlers.clear()
    return (work / f"{name}.log").read_text()


def test_enabled_modes():
    assert enabled("auto", {"SLURM_JOB_ID": "12"}) and not enabled("auto", {})
    assert enabled(True, {}) and not enabled(False, {"SLURM_JOB_ID": "12"})
    with pytest.raises(ValueError, match="shared_process"):
        enabled("sometimes", {})


def test_one_server_embeds_a_bundle(job_files, cmu_small, monkeypatch, restore_logging):  # noqa: F811
    work = job_files
    monkeypatch.setenv("SLIDESNAKE_FEATSERVER_DIR", str(work / "run"))
    monkeypatch.setenv("SLIDESNAKE_FEATSERVER_IDLE_S", "8")
    config = {"on_bad_slide": "fail", "features": {"shared_process": True}}
    logs = [_script(work, cmu_small, f"J{i}", config) for i in range(3)]
    (sock,) = (work / "run").glob("*/*.sock")  # still there: the server waits for more slides
    assert sock.parent.stat().st_mode & 0o777 == 0o700  # no other user can reach it
    pids = [set(re.findall(r"feature server pid (\d+)", text)) for text in logs]
    assert len(pids[0]) == 1 and pids[0] == pids[1] == pids[2], pids  # one server for the 3 jobs
    assert "set up on cpu" in logs[0] and "reused" in logs[1] and "reused" in logs[2]
    assert "set up on cpu" not in logs[1] + logs[2]
    for text in logs:  # each job's own progress lines in its own log
        assert "10/10 tiles (100%)" in text and "summary:" in text
    # the same features as a job in its own process
    monkeypatch.setenv("SLIDESNAKE_FEATSERVER_DIR", str(work / "other"))
    _script(work, cmu_small, "alone", {"on_bad_slide": "fail", "features": {"shared_process": False}})
    ref = open_store(work / "out" / "alone.zarr")
    for i in range(3):
        store = open_store(work / "out" / f"J{i}.zarr")
        for mag in (15.0, 20.0):
            assert np.array_equal(store.features(mag), ref.features(mag))
    # the server goes away after 8 idle seconds, and its socket with it
    for _ in range(120):
        if not sock.exists():
            break
        time.sleep(0.5)
    assert not sock.exists()


def test_a_slide_error_in_the_server_excludes_that_slide(job_files, cmu_small, tiles, monkeypatch,  # noqa: F811
                                                         restore_logging):
    work = job_files
    monkeypatch.setenv("SLIDESNAKE_FEATSERVER_DIR", str(work / "run"))
    monkeypatch.setenv("SLIDESNAKE_FEATSERVER_IDLE_S", "3")
    tiles.assign(keep=False).to_parquet(work / "none_kept.parquet")
    config = {"on_bad_slide": "skip", "features": {"shared_process": True}}
    text = _script(work, cmu_small, "BAD", config, tiles_path=work / "none_kept.parquet")
    assert "no kept tile at any magnification" in text
    store = open_store(work / "out" / "BAD.zarr")
    assert store.attrs.get("excluded"), dict(store.attrs)


def test_socket_differs_by_configuration_and_slurm_job(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIDESNAKE_FEATSERVER_DIR", str(tmp_path))
    a = dict(backbone="resnet18_trunc", weights="none", device="auto")
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    p1 = socket_path(a)
    assert socket_path(dict(a, slide="other.svs", out="x")) == p1  # per-slide arguments do not matter
    assert socket_path(dict(a, backbone="resnet50_trunc")) != p1
    monkeypatch.setenv("SLURM_JOB_ID", "2")
    assert socket_path(a) != p1


def test_staging_copies_reads_and_removes(tmp_path, cmu_small, tiles, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))
    assert resolve_stage_dir("$TMPDIR") == tmp_path / "scratch"
    assert resolve_stage_dir(None) is None
    with staged(cmu_small, "$TMPDIR", slide_id="S1") as local:
        assert Path(local).read_bytes() == Path(cmu_small).read_bytes() and Path(local) != Path(cmu_small)
    assert not list((tmp_path / "scratch").iterdir())  # removed after
    with pytest.raises(RuntimeError):
        with staged(cmu_small, str(tmp_path / "s2")):
            raise RuntimeError("reading failed")
    assert not list((tmp_path / "s2").iterdir())  # removed on error too
    tiles.to_parquet(tmp_path / "tiles.parquet")
    kw = dict(COMMON, slide=str(cmu_small), tiles=str(tmp_path / "tiles.parquet"), slide_id="S1", device="cpu",
              feature_dtype="float32")
    extract_job(out=tmp_path / "a.zarr", **kw)
    extract_job(out=tmp_path / "b.zarr", stage_dir="$TMPDIR", **kw)
    assert np.array_equal(open_store(tmp_path / "a.zarr").features(20.0), open_store(tmp_path / "b.zarr").features(20.0))
    assert open_store(tmp_path / "b.zarr").attrs.get("slide_id") == "S1"


CHILD = """
import json, runpy, sys
from types import SimpleNamespace
a = json.loads(sys.argv[1])
sm = SimpleNamespace(input=SimpleNamespace(**a["input"]), output=SimpleNamespace(**a["output"]),
                     params=SimpleNamespace(**a["params"]), log=[a["log"]], threads=1, config=a["config"])
runpy.run_path(a["script"], init_globals={"snakemake": sm})
"""


def test_concurrent_jobs_wait_in_line_for_one_server(job_files, cmu_small):
    """Jobs that arrive together (features.shared_process: true on a workstation) all get their
    slide embedded by one server, one after the other; none is refused or starts a second one."""
    import subprocess
    import sys

    work = job_files
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts"), "SLIDESNAKE_FEATSERVER_DIR": str(work / "run"),
           "SLIDESNAKE_FEATSERVER_IDLE_S": "5"}
    procs = []
    for i in range(3):
        a = {"input": {"slide": str(cmu_small), "tiles": str(work / "tiles.parquet"),
                       "meta": str(work / "slide.json"), "qc": str(work / "qc.json")},
             "output": {"store": str(work / "out" / f"C{i}.zarr")},
             "params": {"backbone": "resnet18_trunc", "weights": "none", "feature_dtype": "float32"},
             "log": str(work / f"C{i}.log"),
             "config": _with_run_settings({"on_bad_slide": "fail", "features": {"shared_process": True}}),
             "script": str(REPO / "scripts" / "extract_features.py")}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(a)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    pids = set()
    for i in range(3):
        pids |= set(re.findall(r"feature server pid (\d+)", (work / f"C{i}.log").read_text()))
        assert open_store(work / "out" / f"C{i}.zarr").n_tiles(20.0) == 8
    assert len(pids) == 1, pids
