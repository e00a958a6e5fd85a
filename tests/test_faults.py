"""Faults during a real Snakemake run: a job killed with SIGKILL leaves nothing that looks finished,
and the rerun ends with outputs identical to an uninterrupted run's (CPU)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slidesnake.store import open_store
from test_workflow import snakemake, write_config
from conftest import REPO
from slidesnake.demo import make_cohort


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A complete, uninterrupted run (the reference)."""
    workdir = tmp_path_factory.mktemp("faults")
    sheet = make_cohort(workdir / "cohort", n_patients=6, size=1200, seed=5)
    sheet["path"] = [str(Path(p).relative_to(workdir)) for p in sheet["path"]]
    sheet.to_csv(workdir / "cohort" / "samples.tsv", sep="\t", index=False)
    write_config(workdir, features={"batch_size": 4}, training={"epochs": 60, "patience": 60})
    snakemake(workdir, "--cores", "2")
    return workdir, sheet


def _script_pids(workdir: Path, script: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(workdir) in cmd and script in cmd:
            pids.append(int(entry))
    return pids


def _start(workdir: Path, *targets: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "1",
           *targets]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(workdir: Path, script: str, ready, timeout: float = 120) -> None:
    """SIGKILL the job's script process as soon as ``ready()`` holds (as an OOM kill or scancel would)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ready():
            pids = _script_pids(workdir, script)
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.01)
    raise AssertionError(f"{script} never reached the point to kill it")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_killed_extract_features_leaves_no_store_and_rerun_is_identical(done, tmp_path):
    ref, sheet = done
    work = _copy(ref, tmp_path / "w")
    sid = sheet["slide_id"].iloc[0]
    store = work / "results" / "features" / "resnet18_trunc" / f"{sid}.zarr"
    shutil.rmtree(store)
    proc = _start(work, str(store.relative_to(work)))
    # Kill once the store is being written under its temporary name.
    _kill_when(work, "extract_features.py", lambda: any(store.parent.glob(f".tmp-*-{store.name}")))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    assert not store.exists(), "a killed extraction must not leave a store at the final path"
    snakemake(work, "--cores", "2", str(store.relative_to(work)))
    a, b = open_store(store), open_store(ref / store.relative_to(work))
    # CPU convolutions may round differently from run to run: equal to float16 resolution.
    np.testing.assert_allclose(a.features(20), b.features(20), rtol=2e-3, atol=1e-5)
    assert np.array_equal(a.coords(20), b.coords(20))
    assert not list(store.parent.glob(".tmp-*"))


def test_killed_training_leaves_no_checkpoint_and_rerun_is_identical(done, tmp_path):
    ref, _ = done
    # A training parameter changes, so every fold retrains; one copy is killed mid-training and
    # restarted, the other runs uninterrupted.
    work, clean = _copy(ref, tmp_path / "w"), _copy(ref, tmp_path / "clean")
    for d in (work, clean):
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["training"]["lr"] = 3e-4
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    log = work / "logs" / "train" / "abmil" / "fold_0.log"
    log.unlink()
    proc = _start(work)
    _kill_when(work, "train.py", lambda: log.exists() and "epoch   2/" in log.read_text())
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    fold_dir = work / "results" / "models" / "abmil" / "fold_0"
    assert not fold_dir.exists() or not any(
        f.name in ("model.pt", "history.csv", "predictions.csv") for f in fold_dir.iterdir())
    snakemake(work, "--cores", "2")
    snakemake(clean, "--cores", "2")
    ref_dir = clean / "results" / "models" / "abmil" / "fold_0"
    a = torch.load(fold_dir / "model.pt", weights_only=True)
    b = torch.load(ref_dir / "model.pt", weights_only=True)
    assert a["best_epoch"] == b["best_epoch"]
    for k in b["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    pd.testing.assert_frame_equal(pd.read_csv(fold_dir / "predictions.csv"),
                                  pd.read_csv(ref_dir / "predictions.csv"))
    summary = "results/summary/abmil/summary.csv"
    pd.testing.assert_frame_equal(pd.read_csv(work / summary), pd.read_csv(clean / summary))
