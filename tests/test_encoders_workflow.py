"""Encoder weights in the workflow: the weights file is an input of extract_features (replacing it
reruns extraction), a wrong pin fails the job with one line in its log, the store records the
encoder, and training refuses stores of different encoders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slidesnake.store import MixedEncodersError, open_store, write_excluded_store, write_store
from slidesnake.training import load_bags
from test_reruns import copy_run
from test_workflow import snakemake


def _store(path, **attrs):
    n = 3
    groups = {20.0: {"features": np.ones((n, 4)), "coords": np.zeros((n, 2)), "size": np.ones((n, 2)),
                     "grid": np.zeros((n, 2)), "tile_id": np.arange(n)}}
    write_store(path, {"slide_id": path.stem, **attrs}, groups, "float32")
    return path


def test_training_refuses_stores_of_different_encoders(tmp_path):
    uni = {"backbone": "uni", "preset": "uni", "weights_sha256": "a" * 64, "pooling": "cls", "feature_dim": 4}
    a, b = _store(tmp_path / "A.zarr", **uni), _store(tmp_path / "B.zarr", **uni)
    write_excluded_store(tmp_path / "X.zarr", "X", {"stage": "tile", "reason": "r", "fix": "f"}, {"backbone": "other"})
    bags = load_bags([a, b, tmp_path / "X.zarr"], 20.0)
    assert set(bags) == {"A", "B", "X"}

    other = _store(tmp_path / "C.zarr", **{**uni, "weights_sha256": "b" * 64})
    with pytest.raises(MixedEncodersError) as e:
        load_bags([a, b, other], 20.0)
    msg = str(e.value)
    assert "\n" not in msg and "A.zarr" in msg and "C.zarr" in msg and "weights_sha256" in msg
    assert "aaaaaaaaaaaa" in msg and "bbbbbbbbbbbb" in msg
    pooled = _store(tmp_path / "D.zarr", **{**uni, "pooling": "cls+mean"})
    with pytest.raises(MixedEncodersError, match="differ in pooling"):
        load_bags([a, pooled], 20.0)


@pytest.mark.slow
def test_weights_file_is_an_input_and_pin_errors_reach_the_log(small_run, tmp_path):
    import torchvision

    work = copy_run(small_run, tmp_path / "run")
    slide = pd.read_csv(work / "cohort" / "samples.tsv", sep="\t", dtype=str)["slide_id"].iloc[0]
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), work / "w.pth")
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["features"]["weights"] = "w.pth"
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = cfg.get("outdir", "results")
    target = f"{out}/features/resnet18_trunc/{slide}.zarr"

    snakemake(work, "--cores", "1", target)
    attrs = open_store(work / target).attrs
    assert attrs["weights"] == str((work / "w.pth").resolve()) and attrs["weights_files"] == {
        "w.pth": attrs["weights_sha256"]}
    assert attrs["preset"] is None and attrs["pooling"] is None and "torch" in attrs["libraries"]
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(snakemake(work, "-n", target))
    # pinning the file it was extracted with reruns nothing
    cfg["features"]["weights_sha256"] = attrs["weights_sha256"]
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(snakemake(work, "-n", target))

    # replacing the weights file reruns extraction (an input, not only a string param)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), work / "w.pth")
    dry = snakemake(work, "-n", target)
    assert "extract_features" in dry.stdout + dry.stderr

    # a wrong pin: the job fails with one line naming the file and both hashes, in the job's log
    cfg["features"]["weights_sha256"] = "0" * 64
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--cores", "1", target, check=False)
    assert proc.returncode != 0
    log = (work / f"{out}/logs/extract_features/resnet18_trunc/{slide}.log").read_text()
    assert "w.pth: sha256" in log and "0" * 64 in log and "does not match features.weights_sha256" in log

    # a missing weights file is reported while the DAG is built, before any job runs
    cfg["features"]["weights"] = "nowhere.pth"
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "-n", target, check=False)
    assert proc.returncode != 0 and "weights file not found" in proc.stdout + proc.stderr
