"""Coupled embedder / bag-classifier training (training.coupling, ICMIL): pseudo labels, the embedder
step (no val/test slide informs it), the digit benchmark, the workflow's rounds and their reruns."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slidesnake.coupling_rounds import coupled_stores
from slidesnake.coupling import (CouplingSettings, InstanceHead, augment, check_model,
                                 finetune_embedder, select_confident)
from slidesnake.io import sha256_file
from slidesnake.store import open_store

from test_workflow import K, job_counts, snakemake


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ units

def test_negative_slides_give_negative_tiles_only():
    probs = np.tile([[0.01, 0.99]], (10, 1))  # the head calls every tile positive ...
    rows, labels = select_confident(probs, 0, CouplingSettings(tiles_per_slide=100), np.random.default_rng(0))
    assert sorted(rows) == list(range(10)) and not labels.any()  # ... but the slide is negative


def test_fraction_and_threshold_selection():
    p = np.linspace(0, 1, 20)
    probs = np.column_stack([1 - p, p])
    s = CouplingSettings(selection="fraction", top_fraction=0.1, bottom_fraction=0.25, tiles_per_slide=100)
    rows, labels = select_confident(probs, 1, s, np.random.default_rng(0))
    assert set(rows[labels == 1]) == {18, 19} and set(rows[labels == 0]) == {0, 1, 2, 3, 4}
    s = CouplingSettings(selection="threshold", positive_threshold=0.9, negative_threshold=0.05, tiles_per_slide=100)
    rows, labels = select_confident(probs, 1, s, np.random.default_rng(0))
    assert set(rows[labels == 1]) == set(np.flatnonzero(p >= 0.9)) and set(rows[labels == 0]) == {0}
    s = CouplingSettings(selection="fraction", top_fraction=0.5, bottom_fraction=0.5, tiles_per_slide=6)
    rows, labels = select_confident(probs, 1, s, np.random.default_rng(0))
    assert len(rows) == 6 and len(set(rows)) == 6  # bounded per slide


def test_augment_keeps_shape_and_range_and_varies():
    x = torch.rand(8, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    a, b = augment(x, g, 0.05), augment(x, g, 0.05)
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1 and not torch.equal(a, b)


def test_finetune_does_not_touch_the_input_embedder_and_learns_the_labels():
    torch.manual_seed(0)
    emb = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(48, 8))
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    from slidesnake.models import create_model

    model = create_model("abmil", 8, 2, hidden=8)
    head = InstanceHead(model, np.zeros(8), np.ones(8))
    x = torch.rand(64, 3, 4, 4)
    y = (x[:, 0].mean((1, 2)) > 0.5).long().numpy()  # learnable from the pixels
    res = finetune_embedder(emb, head, x, y, CouplingSettings(steps=120, lr=1e-2, ema=0.9, colour_jitter=0.0),
                            log_every=40)
    assert all(torch.equal(before[k], v) for k, v in emb.state_dict().items())
    assert res.history["teacher_acc"].iloc[-1] > res.history["teacher_acc"].iloc[0]
    assert all(not p.requires_grad for p in model.parameters())  # the head stayed frozen


def test_models_without_instance_score_are_refused():
    check_model("abmil")
    check_model("transmil")
    for name in ("cma_mil", "hier_multistain"):
        with pytest.raises(ValueError, match="flat-bag model") as err:
            check_model(name)
        assert "\n" not in str(err.value)


def test_coupled_stores():
    assert coupled_stores("results/features/r18/S1.zarr") is None
    paths = [f"r/coupling/abmil/round_2/fold_{k}/features/S1.zarr" for k in range(3)]
    assert coupled_stores(paths) == {k: p for k, p in enumerate(paths)}


# ------------------------------------------------------------------------- digit benchmark

@pytest.mark.slow
def test_digit_bags_coupling_raises_instance_auc(record_property):
    """ICMIL on digit bags: a random-init CNN embedder, ABMIL; instance AUC over rounds 0-2."""
    from coupling_digits import run

    rows = pd.DataFrame([r for seed in (0, 1, 2) for r in run(seed, rounds=2)])
    record_property("coupling_digits", rows.to_dict(orient="records"))
    by_round = rows.groupby("round")[["bag_auc", "instance_auc"]].mean()
    r0, r2 = by_round.loc[0, "instance_auc"], by_round.loc[2, "instance_auc"]
    assert r2 >= r0 + 0.05, by_round
    for seed, g in rows.groupby("seed"):  # every seed gains, not only the mean
        assert g.set_index("round").loc[2, "instance_auc"] > g.set_index("round").loc[0, "instance_auc"], g


# ---------------------------------------------------------------------------- the workflow

COUPLING = {"rounds": 1, "steps": 2, "batch_size": 4, "tiles_per_slide": 4, "device": "cpu"}
LOCAL = ("--cores", "2", "--max-threads", "1")


def _edit(work: Path, **coupling) -> None:
    path = work / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.setdefault("training", {}).setdefault("coupling", {}).update(coupling)
    path.write_text(yaml.safe_dump(cfg))


def _plan(work: Path) -> tuple[dict[str, int], list[dict[str, str]]]:
    text = (lambda p: p.stdout + p.stderr)(snakemake(work, "-n"))
    if "Nothing to be done" in text:
        return {}, []
    jobs = []
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:[ \t]+.*\n)*)", text, flags=re.M):
        wc = re.search(r"^\s+wildcards: (.*)$", m.group(2), flags=re.M)
        jobs.append({"rule": m.group(1), **dict(kv.split("=", 1) for kv in (wc.group(1).split(", ") if wc else []))})
    return job_counts(text), jobs


def _slides(work: Path) -> list[str]:
    return pd.read_csv(work / "cohort" / "samples.tsv", sep="\t", dtype=str)["slide_id"].tolist()


@pytest.fixture(scope="module")
def coupled_run(small_run, tmp_path_factory):
    """A copy of the small run with one coupling round planned (dry run kept) and then run up to the
    per-round summary (round 1's embedders, stores and models; not the heatmaps, to save time)."""
    work = tmp_path_factory.mktemp("coupled") / "run"
    subprocess.run(["cp", "-a", str(small_run), str(work)], check=True)
    _edit(work, **COUPLING)
    plan = _plan(work)
    snakemake(work, *LOCAL, "results/summary/abmil/coupling_rounds.csv")
    return work, plan


@pytest.mark.slow
def test_one_round_plans_round_jobs_and_never_round_zero(coupled_run):
    work, (counts, _) = coupled_run
    n = len(_slides(work))
    assert counts == {"coupling_embedder": K, "coupling_extract": K * n, "coupling_train": K, "coupling_summary": 1,
                      "summarize": 1, "heatmap": n, "run_summary": 1, "all": 1}


@pytest.mark.slow
def test_round_outputs_record_their_embedder(coupled_run):
    work, _ = coupled_run
    out = work / "results"
    rows = pd.read_csv(out / "summary" / "abmil" / "coupling_rounds.csv")
    assert rows["round"].tolist() == [0, 1] and rows["auc_mean"].notna().all()
    for k in range(K):
        d = out / "coupling" / "abmil" / "round_1" / f"fold_{k}"
        info = json.loads((d / "embedder.json").read_text())
        sha = sha256_file(d / "embedder.pth")
        assert info["weights_sha256"] == sha and info["round"] == 1 and info["fold"] == k
        assert info["bag_model_sha256"] == sha256_file(out / "models" / "abmil" / f"fold_{k}" / "model.pt")
        for sid in _slides(work):  # every slide of the fold re-embedded by that fold's embedder
            attrs = open_store(d / "features" / f"{sid}.zarr").attrs
            assert attrs["weights_sha256"] == sha and Path(attrs["weights"]).name == "embedder.pth"
        base = open_store(out / "features" / "resnet18_trunc" / f"{_slides(work)[0]}.zarr").features(20)
        new = open_store(d / "features" / f"{_slides(work)[0]}.zarr").features(20)
        assert base.shape == new.shape and not np.allclose(base, new)  # the embedder did change


@pytest.mark.slow
def test_embedder_step_reads_training_slides_only(coupled_run, tmp_path):
    """Fold 0's embedder step again, with every validation and test slide of the fold gone (slide
    file and features): the same pseudo labels and bit-identical weights as the workflow's (both with
    one torch thread: the run's --max-threads 1 and this module's one_thread fixture)."""
    from slidesnake.coupling import embedder_step

    work, _ = coupled_run
    out = work / "results"
    splits = pd.read_csv(out / "splits" / "splits.csv", dtype={"slide_id": str, "label": str})
    fold = splits[splits["fold"] == 0]
    held_out = fold.loc[fold["split"] != "train", "slide_id"].tolist()
    assert held_out
    sheet = pd.read_csv(work / "cohort" / "samples.tsv", sep="\t", dtype=str)
    paths = {s: str(work / p) for s, p in zip(sheet["slide_id"], sheet["path"])}
    stores = tmp_path / "stores"
    shutil.copytree(out / "features" / "resnet18_trunc", stores)
    for sid in held_out:
        shutil.rmtree(stores / f"{sid}.zarr")
        paths[sid] = str(tmp_path / "gone.svs")
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    settings = CouplingSettings(**cfg["training"]["coupling"])
    info = embedder_step(fold, sorted(stores.glob("*.zarr")), paths, out / "models" / "abmil" / "fold_0" / "model.pt",
                         ["normal", "tumour"], backbone="resnet18_trunc", weights="none", magnification=20,
                         settings=settings, out_weights=tmp_path / "e.pth", out_info=tmp_path / "e.json",
                         out_labels=tmp_path / "l.csv", fold=0, round=1)
    ref = out / "coupling" / "abmil" / "round_1" / "fold_0"
    assert set(info["training_slides"]) == set(fold.loc[fold["split"] == "train", "slide_id"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "l.csv"), pd.read_csv(ref / "pseudo_labels.csv"))
    mine, theirs = torch.load(tmp_path / "e.pth"), torch.load(ref / "embedder.pth")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.slow
def test_adding_a_round_runs_only_round_two(coupled_run, tmp_path):
    src, _ = coupled_run
    work = tmp_path / "run"
    subprocess.run(["cp", "-a", str(src), str(work)], check=True)
    _edit(work, rounds=2)
    counts, jobs = _plan(work)
    n = len(_slides(work))
    assert counts == {"coupling_embedder": K, "coupling_extract": K * n, "coupling_train": K, "coupling_summary": 1,
                      "summarize": 1, "heatmap": n, "run_summary": 1, "all": 1}
    assert {j["round"] for j in jobs if j["rule"].startswith("coupling_") and "round" in j} == {"2"}


@pytest.mark.slow
def test_a_coupling_setting_reruns_the_rounds_not_round_zero(coupled_run, tmp_path):
    src, _ = coupled_run
    work = tmp_path / "run"
    subprocess.run(["cp", "-a", str(src), str(work)], check=True)
    _edit(work, steps=3)
    counts, jobs = _plan(work)
    assert counts["coupling_embedder"] == K and "train" not in counts and "extract_features" not in counts


def test_structured_model_is_refused_at_parse_time(small_run, tmp_path):
    work = tmp_path / "run"
    subprocess.run(["cp", "-a", str(small_run), str(work)], check=True)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["training"].update(model="cma_mil", coupling={"rounds": 1})
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "-n", check=False)
    assert proc.returncode != 0
    assert "training.coupling.rounds > 0 needs a flat-bag model" in proc.stdout + proc.stderr
    assert "'cma_mil' reads 'multiscale' bags" in proc.stdout + proc.stderr
