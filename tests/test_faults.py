"""Faults during a real Snakemake run: a job killed with SIGKILL while it writes leaves nothing that
looks finished, and the rerun ends with outputs identical to an uninterrupted run's (CPU).

Snakemake deletes a failed job's outputs, so "no output after the kill" alone would pass a writer
that writes in place too. These runs use ``--keep-incomplete`` (Snakemake keeps whatever a killed
job left under the output's name) and watch the final path while the job runs: an output written in
place is seen there before the job ends, and is still there after the kill.
"""

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
from test_workflow import snakemake
from conftest import REPO

pytestmark = pytest.mark.slow


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
           "--keep-incomplete", *targets]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(workdir: Path, script: str, ready, finals: list[Path], timeout: float = 300) -> list[Path]:
    """SIGKILL the job's script process as soon as ``ready()`` holds (as an OOM kill or scancel would);
    until then watch ``finals``: return those that were seen at their final path before the kill."""
    seen: set[Path] = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:  # a deadline against a hang, not a timed assertion
        seen |= {p for p in finals if p.exists()}
        if ready():
            pids = _script_pids(workdir, script)
            if pids:
                seen |= {p for p in finals if p.exists()}
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                return sorted(seen)
        time.sleep(0.005)
    raise AssertionError(f"{script} never reached the point to kill it")


def _copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for key, value in config.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def test_killed_extract_features_leaves_no_store_and_rerun_is_identical(small_run, tmp_path):
    # Small batches: the store is written over many batches, so the kill lands mid-write.
    work = _copy(small_run, tmp_path / "w", features={"batch_size": 4})
    feats = work / "results" / "features" / "resnet18_trunc"
    store = sorted(feats.glob("*.zarr"))[0]
    shutil.rmtree(store)
    proc = _start(work, str(store.relative_to(work)))
    # Kill once the store is being written (under its temporary name, or -- a writer in place --
    # under its own).
    seen = _kill_when(work, "extract_features.py",
                      lambda: store.exists() or any(feats.glob(f".tmp-*-{store.name}")), [store])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    assert not seen, "the store appeared at its final path while it was being written"
    assert not store.exists(), "a killed extraction left a store at the final path (--keep-incomplete)"
    assert len(list(feats.glob(f".tmp-*-{store.name}"))) == 1  # the killed job's temporary
    snakemake(work, "--cores", "2", str(store.relative_to(work)))
    a, b = open_store(store), open_store(small_run / store.relative_to(work))
    # CPU convolutions may round differently from run to run: equal to float16 resolution.
    np.testing.assert_allclose(a.features(20), b.features(20), rtol=2e-3, atol=1e-5)
    assert np.array_equal(a.coords(20), b.coords(20))
    assert not list(feats.glob(".tmp-*"))  # the rerun removed the stale temporary


def test_killed_training_leaves_no_checkpoint_and_rerun_is_identical(small_run, tmp_path):
    # A training parameter changes, so fold 0 retrains; one copy is killed mid-training and
    # restarted, the other runs uninterrupted. Enough epochs that the kill lands mid-training.
    training = {"lr": 3e-4, "epochs": 40, "patience": 40}
    work, clean = (_copy(small_run, tmp_path / d, training=training) for d in ("w", "clean"))
    fold_dir = work / "results" / "models" / "abmil" / "fold_0"
    outputs = [fold_dir / f for f in ("model.pt", "history.csv", "predictions.csv")]
    targets = [str(p.relative_to(work)) for p in outputs]
    for p in outputs:
        p.unlink()
    log = work / "results" / "logs" / "train" / "abmil" / "fold_0.log"
    log.unlink()
    proc = _start(work, *targets)
    seen = _kill_when(work, "train.py", lambda: log.exists() and "epoch   2/" in log.read_text(), outputs)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    assert not seen and not any(p.exists() for p in outputs), "a killed training left fold outputs"
    snakemake(work, "--cores", "2", *targets)
    snakemake(clean, "--cores", "2", *targets)
    ref_dir = clean / "results" / "models" / "abmil" / "fold_0"
    a = torch.load(fold_dir / "model.pt", weights_only=True)
    b = torch.load(ref_dir / "model.pt", weights_only=True)
    assert a["best_epoch"] == b["best_epoch"]
    for k in b["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for name in ("predictions.csv", "history.csv"):
        x, y = pd.read_csv(fold_dir / name), pd.read_csv(ref_dir / name)
        pd.testing.assert_frame_equal(x.drop(columns="seconds", errors="ignore"),
                                      y.drop(columns="seconds", errors="ignore"))
