"""Training loop, checkpoints, determinism and the digit-bags correctness benchmark."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from slidesnake.stages import train_job
from slidesnake.training import (load_bags, load_checkpoint, predict_bag, save_checkpoint, train_fold,
                                 _class_weights)
from digit_bags import CLASSES, digit_bags



@pytest.fixture(scope="module")
def digits_run():
    torch.set_num_threads(1)
    bags, inst, splits = digit_bags()
    res = train_fold(bags, splits, CLASSES, "abmil", {"hidden": 64, "gated": True},
                     lr=1e-3, epochs=20, patience=5, min_epochs=5, seed=0, device="cpu")
    return bags, inst, splits, res


def test_digit_bags_benchmark(digits_run, record_property):
    bags, inst, splits, res = digits_run
    test = res.predictions[res.predictions["split"] == "test"]
    assert len(test) == 100
    bag_auc = roc_auc_score(test["label"] == "nine", test["prob_nine"])
    ckpt = {"feature_mean": res.feature_mean, "feature_std": res.feature_std}
    att, is_nine = [], []
    for sid in test.loc[test["label"] == "nine", "slide_id"]:
        _, a = predict_bag(res.model, ckpt, bags[sid])
        assert a.shape == (len(bags[sid]),) and a.sum() == pytest.approx(1, abs=1e-5)
        att.append(a)
        is_nine.append(inst[sid])
    inst_auc = roc_auc_score(np.concatenate(is_nine), np.concatenate(att))
    for k, v in dict(bag_auc=bag_auc, instance_auc=inst_auc, best_epoch=res.best_epoch,
                     epochs_run=len(res.history)).items():
        record_property(k, v)
    print(f"digit bags: bag AUC {bag_auc:.4f}, instance AUC {inst_auc:.4f}, "
          f"best epoch {res.best_epoch}/{len(res.history)}")
    assert bag_auc >= 0.95
    assert inst_auc >= 0.9
    assert len(res.history) <= 20  # bounded work in epochs; the time is in scripts/bench/bench_digit_bags.py


def test_history_and_predictions_layout(digits_run):
    bags, _, splits, res = digits_run
    h = res.history
    # then one column per named loss term but the total (abmil: its cross-entropy)
    assert list(h.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "val_bacc", "lr", "seconds",
                               "train_ce"]
    assert (h["train_ce"] == h["train_loss"]).all()  # abmil's total is its cross-entropy
    assert h["epoch"].tolist() == list(range(1, len(h) + 1))
    assert res.best_epoch == int(h.loc[h["val_loss"].idxmin(), "epoch"])
    assert len(h) >= 5 and len(h) - res.best_epoch <= 5  # early stopping with patience 5
    p = res.predictions
    assert list(p.columns) == ["fold", "slide_id", "patient_id", "label", "split", "prob_other", "prob_nine", "pred"]
    assert p["slide_id"].tolist() == splits["slide_id"].tolist()
    assert np.allclose(p[["prob_other", "prob_nine"]].sum(axis=1), 1)
    assert (p["pred"] == np.where(p["prob_nine"] > p["prob_other"], "nine", "other")).all()
    assert res.feature_mean.shape == (64,) and (res.feature_std > 0).all()


def test_checkpoint_round_trip(digits_run, tmp_path):
    bags, _, splits, res = digits_run
    path = tmp_path / "fold_0" / "model.pt"
    save_checkpoint(path, res, {"magnification": 20.0, "backbone": "digits", "n": np.int64(3)})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt", "model.pt.sha256"]
    # the sidecar is sha256sum's format: `sha256sum -c` checks it in the fold folder
    assert (path.parent / "model.pt.sha256").read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  model.pt\n"
    model, ckpt = load_checkpoint(path)  # weights_only=True inside
    torch.load(path, weights_only=True)
    assert ckpt["classes"] == CLASSES and ckpt["model_name"] == "abmil" and ckpt["in_dim"] == 64
    assert ckpt["model_kwargs"] == {"hidden": 64, "gated": True}
    assert ckpt["best_epoch"] == res.best_epoch and ckpt["fold"] == 0 and ckpt["n"] == 3
    assert not model.training
    for sid in splits["slide_id"][::25]:
        p0, a0 = predict_bag(res.model, ckpt, bags[sid])
        p1, a1 = predict_bag(model, ckpt, bags[sid])
        np.testing.assert_array_equal(p0, p1)
        np.testing.assert_array_equal(a0, a1)
        row = res.predictions.set_index("slide_id").loc[sid, ["prob_other", "prob_nine"]].to_numpy(float)
        np.testing.assert_allclose(p1, row, rtol=1e-6)
    with pytest.raises(TypeError, match="cannot store"):
        save_checkpoint(tmp_path / "bad.pt", res, {"obj": object()})
    assert not (tmp_path / "bad.pt").exists()


def small_problem(seed=0, n=24, dim=12):
    """Bags of Gaussian instances; positive bags hold a few shifted instances."""
    rng = np.random.default_rng(seed)
    bags, rows = {}, []
    for i in range(n):
        x = rng.normal(size=(int(rng.integers(3, 9)), dim)).astype(np.float32) * 5 + 100
        label = i % 2
        if label:
            x[: int(rng.integers(1, 3)), :3] += 10
        split = "train" if i < n * 0.6 else ("val" if i < n * 0.8 else "test")
        bags[f"s{i}"] = x
        rows.append(dict(fold=2, slide_id=f"s{i}", patient_id=f"p{i}", label=["neg", "pos"][label], split=split))
    return bags, pd.DataFrame(rows)


def test_cpu_determinism():
    bags, splits = small_problem()
    kw = dict(epochs=4, patience=10, seed=1, device="cpu", lr=1e-3)
    a = train_fold(bags, splits, ["neg", "pos"], "abmil", {"hidden": 16}, **kw)
    b = train_fold(bags, splits, ["neg", "pos"], "abmil", {"hidden": 16}, **kw)
    pd.testing.assert_frame_equal(a.history.drop(columns="seconds"), b.history.drop(columns="seconds"))
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    c = train_fold(bags, splits, ["neg", "pos"], "abmil", {"hidden": 16}, **{**kw, "seed": 2})
    assert not np.allclose(a.history["train_loss"], c.history["train_loss"])
    assert not torch.are_deterministic_algorithms_enabled()  # global state restored


def test_empty_bag_skipped(caplog):
    bags, splits = small_problem()
    bags["s3"] = np.zeros((0, 12), np.float32)  # train
    bags["s21"] = np.zeros((0, 12), np.float32)  # test
    with caplog.at_level(logging.WARNING, logger="slidesnake.training"):
        res = train_fold(bags, splits, ["neg", "pos"], "abmil", {"hidden": 8}, epochs=2, device="cpu")
    assert "s3" in caplog.text and "s21" in caplog.text and "empty bag" in caplog.text
    assert set(res.predictions["slide_id"]) == set(splits["slide_id"]) - {"s3", "s21"}
    assert res.skipped == ["s3", "s21"]


def test_input_errors():
    bags, splits = small_problem()
    with pytest.raises(KeyError, match="no features for slide"):
        train_fold({k: v for k, v in bags.items() if k != "s0"}, splits, ["neg", "pos"], epochs=1)
    with pytest.raises(ValueError, match="not in classes"):
        train_fold(bags, splits, ["neg", "other"], epochs=1)
    with pytest.raises(ValueError, match="one fold"):
        train_fold(bags, pd.concat([splits, splits.assign(fold=3)]), ["neg", "pos"], epochs=1)
    with pytest.raises(ValueError, match="optimizer"):
        train_fold(bags, splits, ["neg", "pos"], optimizer="sgd", epochs=1)


def test_auto_class_weights():
    log = logging.getLogger("test")
    w = _class_weights("auto", np.array([0, 0, 0, 1]), ["a", "b"], log)
    np.testing.assert_allclose(w, [4 / 6, 2.0])
    assert (w * np.bincount([0, 0, 0, 1])).sum() == pytest.approx(4)  # mean weight per bag is 1
    np.testing.assert_allclose(_class_weights([1, 2], np.array([0]), ["a", "b"], log), [1, 2])
    np.testing.assert_allclose(_class_weights("none", np.array([0]), ["a", "b"], log), [1, 1])
    with pytest.raises(ValueError, match="one per class"):
        _class_weights([1], np.array([0]), ["a", "b"], log)


def test_train_script_on_zarr_stores(tmp_path):
    from slidesnake.store import write_store

    bags, splits = small_problem(dim=8)
    stores = []
    for sid, x in bags.items():
        n = len(x)
        grid = {"features": x, "coords": np.zeros((n, 2)), "size": np.ones((n, 2)), "grid": np.zeros((n, 2)),
                "tile_id": np.arange(n)}
        noise = {**grid, "features": np.full_like(x, 7.0)}
        write_store(tmp_path / "features" / f"{sid}.zarr", {"slide_id": sid}, {20.0: grid, 5.0: noise},
                    feature_dtype="float32")
        stores.append(str(tmp_path / "features" / f"{sid}.zarr"))
    loaded = load_bags(stores, 20, ["s1", "s2"])
    np.testing.assert_array_equal(loaded["s1"], bags["s1"])
    with pytest.raises(ValueError, match="no features at 10x"):
        load_bags(stores, 10.0, ["s1"])

    splits_csv = tmp_path / "splits.csv"
    pd.concat([splits.assign(fold=0), splits.assign(fold=1)]).to_csv(splits_csv, index=False)
    out = tmp_path / "models" / "abmil" / "fold_0"
    log = logging.getLogger("test_train_job")
    log.setLevel(logging.INFO)
    (tmp_path / "logs").mkdir()
    handler = logging.FileHandler(tmp_path / "logs" / "train.log")
    log.addHandler(handler)
    train_job(features=stores, splits=splits_csv, samples=None, fold=0, classes=["neg", "pos"], model="abmil",
              model_kwargs={"hidden": 8}, magnification=20,
              training={"epochs": 2, "lr": 1e-3, "device": "cpu", "class_weights": "auto"},
              out_model=out / "model.pt", out_history=out / "history.csv", out_predictions=out / "predictions.csv",
              log=log)
    log.removeHandler(handler)
    handler.close()
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == 2
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == len(splits)
    model, ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["magnification"] == 20.0 and ckpt["fold"] == 0
    probs, att = predict_bag(model, ckpt, bags["s0"])
    np.testing.assert_allclose(probs, pred.loc[pred["slide_id"] == "s0", ["prob_neg", "prob_pos"]].to_numpy()[0],
                               rtol=1e-5)
    assert "epoch   2/2" in (tmp_path / "logs" / "train.log").read_text()


def test_tensorboard_event_files_hold_the_history(tmp_path):
    """training.tensorboard: every history column, per epoch, as TensorBoard scalars."""
    pytest.importorskip("tensorboard")  # in the [test] extra; optional for users
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bags, _, splits = digit_bags(n_train=30, n_val=10, n_test=10)
    logdir = tmp_path / "tb" / "fold_0"
    res = train_fold(bags, splits, CLASSES, "clam", {"hidden": 16, "attn_dim": 8, "k_sample": 2},
                     lr=1e-3, epochs=3, patience=3, min_epochs=3, seed=0, device="cpu", tensorboard=logdir)
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"fold_0/train_loss", "fold_0/val_loss", "fold_0/lr", "fold_0/train_instance"} <= tags
    for column in ("train_loss", "val_loss", "train_bag", "train_instance"):
        events = acc.Scalars(f"fold_0/{column}")
        assert [e.step for e in events] == list(res.history["epoch"])
        np.testing.assert_allclose([e.value for e in events], res.history[column], rtol=1e-6)
    # and nothing is written without it
    train_fold(bags, splits, CLASSES, "abmil", {"hidden": 16}, epochs=1, min_epochs=1, seed=0, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]
