"""Integrity of feature stores and checkpoints (slidesnake.integrity): a damaged store or model is
one error naming it and the fix -- or, under on_bad_slide: skip, an exclusion with that reason --
never data read through Zarr's fill value. Real Zarr stores, real files, real Snakemake runs.

Each damage test deletes, truncates or edits a file the way a failing disk or a careless copy does;
before stores recorded a manifest, a deleted chunk read as zeros and training exited 0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from conftest import REPO
from slidesnake.bags import ExcludedBag
from slidesnake.exclusion import excluded_table
from slidesnake.store import StoreWriter, open_store, write_store
from slidesnake.training import load_bags
from test_workflow import snakemake

N, D = 10, 8


def groups(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return {20.0: {"features": rng.normal(size=(n, D)), "coords": np.arange(2 * n).reshape(n, 2) * 10,
                   "size": np.full((n, 2), 10), "grid": np.arange(2 * n).reshape(n, 2), "tile_id": np.arange(n)}}


def damage(store: Path, how: str) -> str:
    """Damage one chunk of the features array (or the store otherwise); the relative path touched."""
    chunk = store / "20x" / "features" / "c" / "1" / "0"
    rel = "20x/features/c/1/0"
    if how == "delete":
        chunk.unlink()
    elif how == "truncate":
        data = chunk.read_bytes()
        chunk.write_bytes(data[: len(data) // 2])
    elif how == "edit":  # same size, other bytes
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    elif how == "zeros":  # same size, every byte zero (a block the file system lost)
        chunk.write_bytes(bytes(chunk.stat().st_size))
    elif how == "attrs":
        root = zarr.open_group(str(store), mode="r+")
        root.attrs["backbone"] = "another"
        rel = "attributes"
    elif how == "extra":
        (store / "20x" / "features" / "c" / "9").mkdir()
        (store / "20x" / "features" / "c" / "9" / "0").write_bytes(b"x")
        rel = "20x/features/c/9/0"
    elif how == "metadata":  # the array now claims fewer rows
        meta = store / "20x" / "features" / "zarr.json"
        meta.write_text(meta.read_text().replace(f"{N},", f"{N - 4},", 1))
        rel = "20x/features/zarr.json"
    return rel


DAMAGES = ["delete", "truncate", "edit", "zeros", "attrs", "extra", "metadata"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_store_is_one_error_naming_slide_store_and_fix(tmp_path, how):
    path = tmp_path / "S1.zarr"
    write_store(path, {"slide_id": "S1", "backbone": "b"}, groups(), chunk_rows=4)
    open_store(path)  # intact: verifies
    rel = damage(path, how)
    with pytest.raises(ValueError) as err:
        open_store(path).features(20.0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "'S1'" in msg and str(path) in msg and f"rm -r {path}" in msg and "rebuilds" in msg
    assert rel in msg
    # the same through training's loader
    with pytest.raises(ValueError, match="feature store of slide 'S1'"):
        load_bags([path], 20.0)


def test_damaged_store_under_skip_is_an_exclusion_with_the_reason(tmp_path):
    good, bad = tmp_path / "G.zarr", tmp_path / "B.zarr"
    write_store(good, {"slide_id": "G"}, groups(seed=1), chunk_rows=4)
    write_store(bad, {"slide_id": "B"}, groups(seed=2), chunk_rows=4)
    damage(bad, "delete")
    bags = load_bags([good, bad], 20.0, on_bad_slide="skip")
    assert isinstance(bags["B"], ExcludedBag) and "20x/features/c/1/0 is missing" in bags["B"].reason
    assert bags["G"].shape == (N, D)
    sheet = pd.DataFrame({"slide_id": ["G", "B"], "patient_id": ["p1", "p2"], "path": ["g.svs", "b.svs"]})
    table = excluded_table(sheet, {"G": open_store(good, on_bad_slide="skip"),
                                   "B": open_store(bad, on_bad_slide="skip")}, [20.0])
    assert table["slide_id"].tolist() == ["B"]
    row = table.iloc[0]
    assert row["stage"] == "extract_features" and row["reason"].startswith("feature store damaged: ")
    assert f"rm -r {bad}" in row["fix"]


def test_unfinished_store_never_validates(tmp_path):
    """A store written without its manifest (the writer died before its last step) is not valid."""
    path = tmp_path / "U.zarr"
    write_store(path, {"slide_id": "U"}, groups())
    root = zarr.open_group(str(path), mode="r+")
    del root.attrs["integrity"]
    with pytest.raises(ValueError, match="no integrity manifest"):
        open_store(path)


def test_manifest_counts_rows_and_chunks_and_every_chunk_is_written(tmp_path):
    path = tmp_path / "Z.zarr"
    g = groups(n=9)
    g[20.0]["grid"][:] = 0  # chunks equal to the fill value are written too (no absent-means-zero)
    with StoreWriter(path, {"slide_id": "Z"}, {20.0: 9}, D, "float32", chunk_rows=4) as w:
        w.write(20.0, 0, g[20.0]["features"])
        for name in ("coords", "size", "grid", "tile_id"):
            w.set(20.0, name, g[20.0][name])
        w.root.attrs["provenance"] = "added inside the block"  # covered by the manifest
    store = open_store(path)
    m = store.attrs["integrity"]
    assert m["arrays"]["20x/features"] == {"shape": [9, D], "chunks": 3}
    assert m["arrays"]["20x/tile_id"] == {"shape": [9], "chunks": 3}
    assert all((path / "20x" / "grid" / "c" / str(i) / "0").is_file() for i in range(3))
    for rel, (size, digest) in m["files"].items():
        data = (path / rel).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == digest
    np.testing.assert_array_equal(store.grid(20.0), 0)


def test_plain_zarr_reader_of_a_damaged_chunk_gets_a_decode_error(tmp_path):
    """Zstandard's frame checksum is on: even without slidesnake, an edited chunk does not decode."""
    path = tmp_path / "P.zarr"
    write_store(path, {"slide_id": "P"}, groups(), chunk_rows=4)
    damage(path, "edit")
    with pytest.raises(Exception, match="(?i)checksum|zstd"):
        zarr.open_group(str(path), mode="r")["20x"]["features"][...]


# ----------------------------------------------------------------------------------- checkpoints

def test_checkpoint_sidecar_checked_before_loading(small_run, tmp_path):
    from slidesnake.integrity import CheckpointIntegrityError
    from slidesnake.training import load_checkpoint

    src = small_run / "results" / "models" / "abmil" / "fold_0"
    fold = tmp_path / "fold_0"
    shutil.copytree(src, fold)
    model = fold / "model.pt"
    assert subprocess.run(["sha256sum", "-c", "model.pt.sha256"], cwd=fold, capture_output=True).returncode == 0
    load_checkpoint(model)
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=f"checkpoint {model} does not match its sha256 sidecar"):
        load_checkpoint(model)
    model.write_bytes(bytes(data[: len(data) // 2]))  # truncated: the same error, not torch's
    with pytest.raises(CheckpointIntegrityError, match="retrain"):
        load_checkpoint(model)
    (fold / "model.pt.sha256").unlink()
    with pytest.raises(CheckpointIntegrityError, match="has no sha256 sidecar"):
        load_checkpoint(model)


FULL_DISK = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    import torch
    from slidesnake.training import TrainResult, save_checkpoint
    from slidesnake.models import create_model
    out = Path(sys.argv[1])
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)]).returncode == 0
    model = create_model("abmil", 512, 2, hidden=256)
    res = TrainResult(model=model, history=None, predictions=None, best_epoch=1, model_name="abmil",
                      in_dim=512, classes=["a", "b"], feature_mean=torch.zeros(512), feature_std=torch.ones(512))
    try:
        save_checkpoint(out / "fold_0" / "model.pt", res)
    except OSError as e:
        print("ERROR", type(e).__name__, e)
        print("LEFT", sorted(p.name for p in (out / "fold_0").iterdir()))
""")


def test_full_disk_while_saving_a_checkpoint_says_no_space_left(tmp_path):
    """A 64 KiB tmpfs (mounted in a user + mount namespace, `unshare -rm`) fills while model.pt is
    written: one line saying "no space left on device", the file and the fix; no partial file left."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    (tmp_path / "disk").mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
    proc = subprocess.run(["unshare", "-rm", sys.executable, str(script), str(tmp_path / "disk")],
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout
    assert "ERROR DiskFullError" in out, out + proc.stderr
    line = next(ln for ln in out.splitlines() if ln.startswith("ERROR"))
    assert "no space left on device while writing" in line and "model.pt" in line and "free disk space" in line
    assert "LEFT []" in out  # the temporary was removed


# ---------------------------------------------------------------------------------- in a real run

@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_damaged_store_in_a_run(small_run, tmp_path, mode):
    """A chunk deleted from one slide's store of a finished run: the next job reading the stores
    fails with the one line in its log (fail) or lists the slide as excluded (skip)."""
    work = tmp_path / "run"
    subprocess.run(["cp", "-a", str(small_run), str(work)], check=True)
    slide = pd.read_csv(work / "cohort" / "samples.tsv", sep="\t", dtype=str)["slide_id"][0]
    store = work / "results" / "features" / "resnet18_trunc" / f"{slide}.zarr"
    chunk = next(p for p in sorted((store / "20x" / "features").rglob("*")) if p.is_file() and "/c/" in str(p))
    chunk.unlink()
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["on_bad_slide"] = mode
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--cores", "1", "--forcerun", "excluded_table", "--until", "excluded_table",
                     check=(mode == "skip"))
    if mode == "fail":
        assert proc.returncode != 0
        log = (work / "results" / "logs" / "excluded_table.log").read_text()
        errors = [ln for ln in log.splitlines() if " ERROR " in ln]
        assert len(errors) == 1 and "Traceback" not in log
        assert f"feature store of slide '{slide}'" in errors[0] and "is missing" in errors[0]
        assert f"rm -r {store}" in errors[0] or f"rm -r results/features/resnet18_trunc/{slide}.zarr" in errors[0]
    else:
        table = pd.read_csv(work / "results" / "qc" / "excluded.tsv", sep="\t", dtype=str)
        assert table["slide_id"].tolist() == [slide]
        assert table["reason"][0].startswith("feature store damaged: ") and "is missing" in table["reason"][0]


def test_arrays_added_through_the_writer_are_covered(tmp_path):
    """Other writers (e.g. per-round stores) add arrays with StoreWriter.add_array and get the
    manifest for free; damaging the added array is caught like any other."""
    path = tmp_path / "R.zarr"
    g = groups(n=9)[20.0]
    with StoreWriter(path, {"slide_id": "R"}, {20.0: 9}, D, "float32", chunk_rows=4) as w:
        w.write(20.0, 0, g["features"])
        for name in ("coords", "size", "grid", "tile_id"):
            w.set(20.0, name, g[name])
        w.add_array(20.0, "round_1", np.zeros((9, 3), dtype="float32"))
    assert open_store(path).attrs["integrity"]["arrays"]["20x/round_1"] == {"shape": [9, 3], "chunks": 3}
    (path / "20x" / "round_1" / "c" / "2" / "0").unlink()
    with pytest.raises(ValueError, match="chunk 20x/round_1/c/2/0 is missing"):
        open_store(path)
