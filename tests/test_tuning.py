"""Optional Optuna hyperparameter search (slidesnake.tuning, scripts/tune.py, the tune rule)."""

from __future__ import annotations

import runpy
import subprocess
import sys
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

optuna = pytest.importorskip("optuna")

from conftest import REPO  # noqa: E402
from digit_bags import CLASSES, digit_bags  # noqa: E402
from slidesnake.models import get_model_class  # noqa: E402
from slidesnake.tuning import best_config, fold_tables, suggest, trials_table, tune, val_nll  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NoTestBags(Mapping):
    """Bags whose test slides must never be read."""

    def __init__(self, bags, test_ids):
        self.bags, self.test_ids, self.read = bags, set(test_ids), set()

    def __getitem__(self, key):
        if key in self.test_ids:
            raise AssertionError(f"tuning read the test slide {key}")
        self.read.add(key)
        return self.bags[key]

    def __iter__(self):
        return iter(self.bags)

    def __len__(self):
        return len(self.bags)


def two_fold_digits():
    bags, _, splits = digit_bags(n_train=30, n_val=12, n_test=10, seed=1)
    fold1 = splits.copy()
    fold1["fold"] = 1
    # fold 1 swaps 12 training bags into val and the val bags into train
    swap = fold1.index[fold1["split"] == "train"][:12]
    fold1.loc[fold1["split"] == "val", "split"] = "train"
    fold1.loc[swap, "split"] = "val"
    return bags, pd.concat([splits, fold1], ignore_index=True)


def test_search_on_digit_bags_never_reads_test():
    bags, splits = two_fold_digits()
    guarded = NoTestBags(bags, splits.loc[splits["split"] == "test", "slide_id"])
    training = dict(epochs=3, patience=2, min_epochs=1, device="cpu", seed=0)
    study = tune(guarded, splits, CLASSES, "clam", {"hidden": 16, "attn_dim": 8}, training, n_trials=2, seed=0)
    assert len(study.trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert guarded.read == set(splits.loc[splits["split"] != "test", "slide_id"])
    best = study.best_trial
    assert set(best.params) == {"lr", "weight_decay", "dropout", "k_sample", "bag_weight", "inst_loss"}
    assert best.value == pytest.approx(np.mean([best.user_attrs["fold_0"], best.user_attrs["fold_1"]]))
    assert 1e-5 <= best.params["lr"] <= 1e-3 and 0 <= best.params["dropout"] <= 0.5
    # the objective: NLL of the val labels under the early-stopped model, reproducible from the trial
    kw = {"hidden": 16, "attn_dim": 8, **{k: v for k, v in best.params.items() if k not in ("lr", "weight_decay")}}
    from slidesnake.training import train_fold

    rows = fold_tables(splits)[0]
    res = train_fold(bags, rows, CLASSES, "clam", kw, **training, lr=best.params["lr"],
                     weight_decay=best.params["weight_decay"])
    assert val_nll(res.predictions, CLASSES) == pytest.approx(best.user_attrs["fold_0"], rel=1e-6)

    table = trials_table(study)
    assert len(table) == 2 and {"number", "value", "state", "duration_s", "params_lr", "user_attrs_fold_1"} <= set(
        table.columns)
    cfg = best_config(study, "clam", {"hidden": 16, "attn_dim": 8})
    assert cfg["training"]["model"] == "clam" and cfg["training"]["lr"] == best.params["lr"]
    assert cfg["training"]["model_kwargs"]["hidden"] == 16
    assert cfg["training"]["model_kwargs"]["k_sample"] == best.params["k_sample"]
    assert "lr" not in cfg["training"]["model_kwargs"]
    again = tune(bags, splits, CLASSES, "clam", {"hidden": 16, "attn_dim": 8}, training, n_trials=2, seed=0)
    assert [t.params for t in again.trials] == [t.params for t in study.trials]  # seeded sampler
    assert [t.value for t in again.trials] == pytest.approx([t.value for t in study.trials])


def test_search_spaces_and_errors():
    trial = optuna.trial.FixedTrial({"lr": 1e-4, "weight_decay": 1e-5, "dropout": 0.1, "sub_bag_size": 8,
                                     "delta": 1.0, "lambda_con": 0.5})
    training, kwargs = suggest(trial, "da_mil", {"hidden": 32, "sub_bag_size": 64})
    assert training == {"lr": 1e-4, "weight_decay": 1e-5}
    assert kwargs == {"hidden": 32, "sub_bag_size": 8, "dropout": 0.1, "delta": 1.0, "lambda_con": 0.5}
    for name in ("abmil", "clam", "transmil", "da_mil"):
        assert callable(getattr(get_model_class(name), "search_space", None)), name
    bags, splits = two_fold_digits()
    with pytest.raises(ValueError, match="objective"):
        tune(bags, splits, CLASSES, "abmil", objective="auc")
    with pytest.raises(ValueError, match="no val slide"):
        fold_tables(splits.assign(split=splits["split"].replace("val", "train")))
    preds = pd.DataFrame({"split": ["val", "val", "train"], "label": ["other", "nine", "nine"],
                          "prob_other": [0.8, 0.4, 0.5], "prob_nine": [0.2, 0.6, 0.5]})
    assert val_nll(preds, CLASSES) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)


def test_tune_script_writes_a_valid_config_fragment(tmp_path):
    from snakemake.utils import validate

    from slidesnake.store import write_store

    bags, splits = two_fold_digits()
    stores = []
    for sid, x in bags.items():
        n = len(x)
        grid = {"features": x, "coords": np.zeros((n, 2)), "size": np.ones((n, 2)), "grid": np.zeros((n, 2)),
                "tile_id": np.arange(n)}
        write_store(tmp_path / "features" / f"{sid}.zarr", {"slide_id": sid}, {20.0: grid}, feature_dtype="float32")
        stores.append(str(tmp_path / "features" / f"{sid}.zarr"))
    splits.to_csv(tmp_path / "splits.csv", index=False)
    out = tmp_path / "tuning" / "abmil"
    sm = SimpleNamespace(
        input=SimpleNamespace(splits=str(tmp_path / "splits.csv"), features=stores, samples=None),
        output=SimpleNamespace(best=str(out / "best_params.yaml"), study=str(out / "study.csv")),
        params=SimpleNamespace(model="abmil", model_kwargs={"attn_dim": 8}, magnification=20, magnifications=None,
                               classes=CLASSES, tuning={"n_trials": 2, "seed": 0, "timeout_s": None},
                               training={"epochs": 2, "patience": 2, "min_epochs": 1, "seed": 0,
                                         "optimizer": "adamw", "class_weights": "auto"}),
        threads=1, log=[str(tmp_path / "logs" / "tune.log")],
        config={"on_bad_slide": "fail", "training": {"device": "cpu", "tensorboard": False}},
    )
    runpy.run_path(str(REPO / "scripts" / "tune.py"), init_globals={"snakemake": sm})
    study = pd.read_csv(out / "study.csv")
    assert len(study) == 2 and (study["state"] == "COMPLETE").all()
    text = (out / "best_params.yaml").read_text()
    assert text.startswith("# Best of 2 Optuna trials for 'abmil'")
    fragment = yaml.safe_load(text)
    assert fragment["training"]["model"] == "abmil" and fragment["training"]["model_kwargs"]["attn_dim"] == 8
    assert fragment["training"]["lr"] == pytest.approx(study.loc[study["value"].idxmin(), "params_lr"])
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["training"].update(fragment["training"])  # as snakemake --configfile merges it
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    log = (tmp_path / "logs" / "tune.log").read_text()
    assert "trial 1: val_nll" in log and "epoch" not in log


def test_tune_rule_is_a_target(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    lines = ["slide_id\tpatient_id\tlabel\tpath"]
    for i in range(6):
        (slides / f"s{i}.svs").write_bytes(b"")
        lines.append(f"s{i}\tp{i}\t{['normal', 'tumour'][i % 2]}\t{slides / f's{i}.svs'}")
    (tmp_path / "samples.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"samples": "samples.tsv", "classes": ["normal", "tumour"], "splits": {"k": 3},
         "tuning": {"n_trials": 5, "timeout_s": 600}}))

    def dry(*target) -> dict[str, int]:
        """The dry run's 'Job stats' as {rule: count}."""
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory",
               str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "-n", *target]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts = {}
        for line in (proc.stdout + proc.stderr).split("Job stats:", 1)[1].splitlines()[3:]:
            parts = line.split()
            if len(parts) != 2 or parts[0] == "total":
                break
            counts[parts[0]] = int(parts[1])
        return counts

    # (the default target's jobs, without tune, are asserted by test_workflow's dry run)
    assert dry("results/tuning/da_mil/best_params.yaml") == {"excluded_table": 1, "make_splits": 1, "tile": 6, "filter_tissue": 6,
                                                               "extract_features": 6, "tune": 1}
