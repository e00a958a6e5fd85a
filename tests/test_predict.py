"""Inference with a trained run's fold models: ensemble predictions, patch-by-patch predictions, the
predict sheet, and the `predict` target on new slides beside a completed run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slidesnake.bags import CaseBag
from slidesnake.models import create_model
from slidesnake.predict import (ensemble_predictions, fold_checkpoints, models_table, patch_probabilities,
                                supports_patch_predictions)
from slidesnake.samples import SampleSheetError, check_predict_sheet, read_predict_sheet
from slidesnake.training import TrainResult, load_checkpoint, predict_output, save_checkpoint

CLASSES = ["normal", "tumour"]


def fake_checkpoint(path: Path, fold: int, *, model: str = "abmil", dim: int = 12, classes=CLASSES,
                    **kwargs) -> Path:
    """A checkpoint as rule train writes it, of a randomly initialised model (seeded by the fold)."""
    torch.manual_seed(100 + fold)
    net = create_model(model, dim, len(classes), **kwargs).eval()
    rng = np.random.default_rng(fold)
    result = TrainResult(model=net, history=pd.DataFrame(), predictions=pd.DataFrame(), best_epoch=1,
                         model_name=model, model_kwargs=kwargs, in_dim=dim, classes=list(classes),
                         feature_mean=rng.normal(size=dim).astype(np.float32),
                         feature_std=rng.uniform(0.5, 2, size=dim).astype(np.float32), fold=fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, result, {"magnification": 20.0, "bag_type": net.bag_type, "magnifications": None})
    return path


@pytest.fixture
def run_models(tmp_path) -> list[Path]:
    return [fake_checkpoint(tmp_path / "models" / "abmil" / f"fold_{k}" / "model.pt", k) for k in range(3)]


def test_ensemble_is_the_mean_of_the_fold_models(run_models):
    rng = np.random.default_rng(0)
    bags = {"s1": rng.normal(size=(9, 12)).astype(np.float32), "s2": rng.normal(size=(1, 12)).astype(np.float32),
            "empty": np.zeros((0, 12), np.float32), "s3": rng.normal(size=(30, 12)).astype(np.float32)}
    df = ensemble_predictions(run_models, bags)
    assert list(df["slide_id"]) == ["s1", "s2", "empty", "s3"]
    assert list(df.columns) == ["slide_id", "n_tiles", "prob_normal", "prob_tumour", "pred",
                                *[f"fold{k}_prob_{c}" for k in range(3) for c in CLASSES], "status"]
    for sid in ("s1", "s2", "s3"):
        row = df.set_index("slide_id").loc[sid]
        each = np.stack([predict_output(*load_checkpoint(p), bags[sid])[0] for p in run_models])
        for k in range(3):
            assert np.allclose([row[f"fold{k}_prob_{c}"] for c in CLASSES], each[k], atol=1e-6)
        assert np.allclose([row["prob_normal"], row["prob_tumour"]], each.mean(0), atol=1e-6)
        assert row["pred"] == CLASSES[int(each.mean(0).argmax())] and row["status"] == "ok"
        assert row["n_tiles"] == len(bags[sid])
    # the folds disagree (different models), so the mean is not any one of them
    s1 = df.set_index("slide_id").loc["s1"]
    assert len({round(s1[f"fold{k}_prob_tumour"], 6) for k in range(3)}) == 3
    empty = df.set_index("slide_id").loc["empty"]
    assert np.isnan(empty["prob_tumour"]) and empty["pred"] == "" and "empty" in empty["status"]
    # the models used: path, sha256 of the file, fold
    models = pd.DataFrame(df.attrs["models"])
    assert list(models["fold"]) == [0, 1, 2] and list(models["path"]) == [str(p) for p in run_models]
    assert list(models["sha256"]) == [hashlib.sha256(p.read_bytes()).hexdigest() for p in run_models]
    assert models_table(run_models)[["fold", "path", "sha256"]].equals(models[["fold", "path", "sha256"]])


def test_ensemble_rejects_mixed_runs_and_other_backbones(run_models, tmp_path):
    other = fake_checkpoint(tmp_path / "other" / "model.pt", 0, classes=["a", "b"])
    with pytest.raises(ValueError, match="classes"):
        ensemble_predictions([*run_models, other], {"s": np.ones((3, 12), np.float32)})
    with pytest.raises(ValueError, match=r"s: features of dimension \[7\].*expects 12.*backbone"):
        ensemble_predictions(run_models, {"s": np.ones((3, 7), np.float32)})


def test_ensemble_of_hierarchical_models_predicts_cases(tmp_path):
    paths = [fake_checkpoint(tmp_path / f"fold_{k}" / "model.pt", k, model="hier_multistain", hidden=16,
                             attn_dim=8) for k in range(2)]
    rng = np.random.default_rng(1)
    case = CaseBag({"HE": [rng.normal(size=(5, 12)).astype(np.float32)],
                    "IHC": [rng.normal(size=(4, 12)).astype(np.float32), rng.normal(size=(2, 12)).astype(np.float32)]},
                   {"HE": ["a1"], "IHC": ["a2", "a3"]}, "A")
    df = ensemble_predictions(paths, {"A": case})
    each = np.stack([predict_output(*load_checkpoint(p), case)[0] for p in paths])
    assert df["slide_id"].tolist() == ["A"] and df["n_tiles"].tolist() == [11]
    assert np.allclose(df[["prob_normal", "prob_tumour"]].to_numpy()[0], each.mean(0), atol=1e-6)


def test_missing_checkpoint_is_one_line_naming_it(run_models, tmp_path):
    models_dir = tmp_path / "models" / "abmil"
    assert fold_checkpoints(models_dir, [0, 1, 2]) == [str(p) for p in run_models]
    with pytest.raises(FileNotFoundError) as err:
        fold_checkpoints(models_dir, [0, 1, 2, 3])
    msg = str(err.value)
    assert "\n" not in msg and str(models_dir / "fold_3" / "model.pt") in msg and "train first" in msg


# ------------------------------------------------------------------------------ patch predictions

FLAT = [("abmil", {}), ("clam", {"hidden": 32, "attn_dim": 16}), ("clam", {"hidden": 32, "multi_branch": True}),
        ("da_mil", {"hidden": 32, "sub_bag_size": 4}), ("transmil", {"hidden": 32, "heads": 4})]


@pytest.mark.parametrize("name,kwargs", FLAT, ids=[f"{n}{'-mb' if k.get('multi_branch') else ''}" for n, k in FLAT])
def test_patch_probabilities_are_each_tile_alone_as_a_bag(name, kwargs, tmp_path):
    path = fake_checkpoint(tmp_path / "model.pt", 0, model=name, classes=["a", "b", "c"], **kwargs)
    model, ckpt = load_checkpoint(path)
    assert supports_patch_predictions(model)
    x = np.random.default_rng(2).normal(size=(11, 12)).astype(np.float32)
    probs = patch_probabilities(model, ckpt, x, chunk_size=4)  # chunks of 4, 4 and 3 tiles
    assert probs.shape == (11, 3) and np.allclose(probs.sum(1), 1)
    alone = np.stack([predict_output(model, ckpt, x[i:i + 1])[0] for i in range(len(x))])
    assert np.allclose(probs, alone, atol=1e-5)
    # not the slide's prediction repeated: tiles differ from each other
    assert np.ptp(probs[:, 0]) > 1e-4
    assert patch_probabilities(model, ckpt, x[:0]).shape == (0, 3)


def test_nystrom_pinv_of_a_batch_is_each_element_alone():
    # what makes TransMIL's batch of one-tile bags equal to each bag alone
    from slidesnake.models.nystrom import moore_penrose_iter_pinv

    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(3, 2, 6, 6, generator=g) * torch.tensor([1.0, 5.0, 20.0])[:, None, None, None], -1)
    z = moore_penrose_iter_pinv(x)
    for i in range(3):
        assert torch.allclose(z[i:i + 1], moore_penrose_iter_pinv(x[i:i + 1]), atol=1e-6)


def test_patch_predictions_only_for_flat_bag_models(tmp_path):
    for name, kwargs in [("cma_mil", {"magnifications": [10.0, 20.0], "hidden": 16}),
                         ("hier_multistain", {"hidden": 16, "attn_dim": 8})]:
        model = create_model(name, 12, 2, **kwargs)
        assert not supports_patch_predictions(model)
        with pytest.raises(ValueError, match="flat-bag model"):
            patch_probabilities(model, {"feature_mean": np.zeros(12), "feature_std": np.ones(12)},
                                np.ones((3, 12), np.float32))


# ------------------------------------------------------------------------------ predict sheet

def test_predict_sheet_needs_no_labels_and_names_bad_rows(tmp_path):
    from conftest import REPO

    schema = REPO / "workflow" / "schemas" / "predict_samples.schema.yaml"
    good = tmp_path / "new.tsv"
    good.write_text("slide_id\tpath\tstain\nn1\tslides/n1.svs\tHE\nn2\tslides/n2.svs\t\n")
    df = read_predict_sheet(good)
    check_predict_sheet(df, str(good), schema=schema)
    assert list(df["patient_id"]) == ["n1", "n2"]  # default: a patient of one slide
    bad = tmp_path / "bad.tsv"
    bad.write_text("slide_id\tpath\tmpp\nn/1\ta.svs\t0.5\nn2\ta.svs\t-1\n")
    training = pd.DataFrame({"slide_id": ["n2"], "path": ["elsewhere.svs"]})
    with pytest.raises(SampleSheetError) as err:
        check_predict_sheet(read_predict_sheet(bad), str(bad), schema=schema, training=training)
    problems = err.value.problems
    assert any(p.startswith("row 1 (slide 'n/1'): column 'slide_id'") for p in problems)
    assert any(p.startswith("row 2 (slide 'n2'): column 'mpp'") for p in problems)
    assert any("a.svs is listed for several slides" in p for p in problems)
    assert any(p.startswith("row 2 (slide 'n2'): the training sample sheet") and "elsewhere.svs" in p
               for p in problems)
    assert all("\n" not in p for p in problems)
    nopath = tmp_path / "nopath.tsv"
    nopath.write_text("slide_id\tlabel\nn1\ttumour\n")
    with pytest.raises(SampleSheetError, match="missing column.*path"):
        read_predict_sheet(nopath)


# ------------------------------------------------------------------------------ the predict target

def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_predict_target_on_new_slides_leaves_the_trained_run_alone(small_run, tmp_path):
    import time

    from slidesnake.demo import make_cohort, predict_sheet
    from slidesnake.predict import predict_sheet_bags
    from slidesnake.store import open_store
    from test_reruns import copy_run
    from test_workflow import snakemake

    work = copy_run(small_run, tmp_path / "run")
    res = work / "results"
    new = make_cohort(work / "new", n_patients=2, slides_per_patient=(1, 1), size=1200, seed=17)
    new["path"] = [str(Path(p).relative_to(work)) for p in new["path"]]
    sheet = predict_sheet(new, "NEW-")
    sheet.to_csv(work / "new" / "predict.tsv", sep="\t", index=False)
    assert "label" not in sheet and set(sheet["slide_id"]) == {"NEW-PAT01_S1", "NEW-PAT02_S1"}
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    models = sorted((res / "models" / "abmil").glob("fold_*/model.pt"))
    assert len(models) == 3
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in models}
    before = {d: _tree_state(res / d) for d in ("models", "summary")}

    # a predict section leaves `all` as it was
    cfg["predict"] = {"samples": "new/predict.tsv", "name": "batch1", "models": "results/models/nowhere"}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(work, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr
    # untrained models: one line naming the checkpoint, before any job runs
    out = snakemake(work, "-n", "predict", check=False)  # (the target after a flag: --configfile takes many)
    assert out.returncode != 0
    line = [ln for ln in (out.stdout + out.stderr).splitlines() if "results/models/nowhere/fold_0/model.pt" in ln]
    assert line and "train first" in line[0]

    del cfg["predict"]["models"]  # default: the run's own models/abmil
    cfg["heatmap"] = {**cfg.get("heatmap", {}), "patch_predictions": True}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    snakemake(work, "--cores", "2", "predict")
    seconds = time.perf_counter() - t0
    out_dir = res / "predict" / "batch1"
    pred = pd.read_csv(out_dir / "predictions.csv")
    assert sorted(pred["slide_id"]) == sorted(sheet["slide_id"])
    for c in ("prob_normal", "prob_tumour", *[f"fold{k}_prob_{c}" for k in range(3) for c in CLASSES]):
        assert pred[c].between(0, 1).all(), c
    folds = np.stack([pred[[f"fold{k}_prob_normal", f"fold{k}_prob_tumour"]].to_numpy() for k in range(3)])
    assert np.allclose(pred[["prob_normal", "prob_tumour"]].to_numpy(), folds.mean(0), atol=1e-6)
    assert (pred["status"] == "ok").all() and set(pred["patient_id"]) == {"NEW-PAT01", "NEW-PAT02"}
    # the same numbers from the package on the new stores
    stores = [res / "features" / "resnet18_trunc" / f"{s}.zarr" for s in sheet["slide_id"]]
    bags = predict_sheet_bags(stores, read_predict_sheet(work / "new" / "predict.tsv"),
                              torch.load(models[0], weights_only=True))
    again = ensemble_predictions([str(p) for p in models], bags).set_index("slide_id")
    assert np.allclose(again.loc[pred["slide_id"], "prob_tumour"], pred["prob_tumour"], atol=1e-6)
    used = pd.read_csv(out_dir / "models.tsv", sep="\t")
    assert sorted(used["sha256"]) == sorted(sha.values()) and list(used["fold"]) == [0, 1, 2]
    for sid in sheet["slide_id"]:
        assert (out_dir / "heatmaps" / f"{sid}.png").stat().st_size > 10_000
        tiles = pd.read_csv(out_dir / "heatmaps" / f"{sid}.tiles.csv")
        n = len(open_store(res / "features" / "resnet18_trunc" / f"{sid}.zarr").tile_ids(20))
        assert len(tiles) == n > 0
        assert np.isclose(tiles["attention"].sum(), 1, atol=1e-4)
        assert np.allclose(tiles["patch_prob_normal"] + tiles["patch_prob_tumour"], 1)
        assert (out_dir / "heatmaps" / f"{sid}.geojson").exists()
    # the trained run is read, never rebuilt or changed
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in models} == sha
    assert {d: _tree_state(res / d) for d in ("models", "summary")} == before
    assert not list(res.rglob(".tmp-*"))
    out = snakemake(work, "-n", "predict")
    assert "Nothing to be done" in out.stdout + out.stderr
    print(f"predict target: 2 new slides (tile, tissue, features, heatmaps, ensemble) in {seconds:.0f} s")

    # on_bad_slide: skip covers the predict sheet too: a missing file gets a row saying why
    gone = pd.concat([sheet, pd.DataFrame([{"slide_id": "NEW-GONE", "patient_id": "NEW-PAT09",
                                             "path": "new/slides/gone.svs"}])], ignore_index=True)
    gone.to_csv(work / "new" / "predict2.tsv", sep="\t", index=False)
    cfg["predict"] = {"samples": "new/predict2.tsv", "name": "batch2"}
    cfg["on_bad_slide"] = "skip"
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(work, "--cores", "2", "predict")
    pred2 = pd.read_csv(res / "predict" / "batch2" / "predictions.csv").set_index("slide_id")
    assert "file not found" in pred2.loc["NEW-GONE", "status"] and np.isnan(pred2.loc["NEW-GONE", "prob_tumour"])
    assert np.allclose(pred2.loc[pred["slide_id"], "prob_tumour"], pred["prob_tumour"], atol=1e-6)
    assert len(pd.read_csv(res / "predict" / "batch2" / "heatmaps" / "NEW-GONE.tiles.csv")) == 0
    assert {d: _tree_state(res / d) for d in ("models", "summary")} == before
