"""End-to-end Snakemake runs of the structured-bag models on tiny generated cohorts:
cma_mil on three magnifications (multiscale bags) and hier_multistain on a two-stain cohort (case bags)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from slidesnake.demo import make_cohort
from slidesnake.store import open_store
from slidesnake.training import load_checkpoint
from test_workflow import K, snakemake, write_config

pytestmark = pytest.mark.slow
MAGS = [5, 10, 20]


def relative_sheet(workdir: Path, sheet: pd.DataFrame) -> pd.DataFrame:
    sheet = sheet.copy()
    sheet["path"] = [str(Path(p).relative_to(workdir)) for p in sheet["path"]]
    sheet.to_csv(workdir / "cohort" / "samples.tsv", sep="\t", index=False)
    return sheet


def check_folds_and_summary(workdir: Path, model: str, units: list[str]) -> pd.DataFrame:
    """Every fold trained (checkpoint, history, predictions) and the summary covers every unit once."""
    res = workdir / "results"
    for fold in range(K):
        d = res / "models" / model / f"fold_{fold}"
        hist = pd.read_csv(d / "history.csv")
        assert len(hist) >= 1 and hist["val_loss"].notna().all()
        pred = pd.read_csv(d / "predictions.csv", dtype={"slide_id": str, "patient_id": str})
        assert set(pred["split"]) == {"train", "val", "test"}
        m, ckpt = load_checkpoint(d / "model.pt")
        assert ckpt["model_name"] == model and ckpt["fold"] == fold
    summary = pd.read_csv(res / "summary" / model / "summary.csv", dtype={"fold": str})
    assert set(summary["fold"]) == {*map(str, range(K)), "mean", "sd"}
    assert summary["n"].iloc[:K].sum() == len(units)
    oof = pd.read_csv(res / "summary" / model / "predictions.csv", dtype={"slide_id": str, "patient_id": str})
    assert sorted(oof["slide_id"]) == sorted(units)  # every unit tested exactly once
    return oof


@pytest.fixture(scope="module")
def cma_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e_cma")
    # 112 px tiles: a 1024 px slide holds 2 x 2 tiles at 5x, 4 x 4 at 10x and 9 x 9 at 20x.
    sheet = relative_sheet(workdir, make_cohort(workdir / "cohort", n_patients=6, slides_per_patient=(1, 1),
                                                size=1024, seed=3))
    write_config(workdir, tiling={"magnifications": MAGS, "tile_size": 112},
                 training={"model": "cma_mil", "magnifications": MAGS, "epochs": 4, "patience": 2,
                           "model_kwargs": {"hidden": 32, "heads": 2, "k_sample": 4}})
    # Heatmaps (one panel per magnification) of one slide of each label: the others are the same job.
    shown = [sheet.loc[sheet["label"] == label, "slide_id"].iloc[0] for label in ("normal", "tumour")]
    t0 = time.perf_counter()
    snakemake(workdir, "--cores", "2", "results/summary/cma_mil/summary.csv",
              *(f"results/heatmaps/cma_mil/{sid}.png" for sid in shown))
    return workdir, sheet, shown, time.perf_counter() - t0


def test_cma_mil_end_to_end(cma_run, record_property):
    workdir, sheet, shown, seconds = cma_run
    record_property("seconds", seconds)
    print(f"cma_mil end to end: {len(sheet)} slides, {seconds:.0f} s")
    res = workdir / "results"
    store = open_store(res / "features" / "resnet18_trunc" / f"{sheet['slide_id'][0]}.zarr")
    assert store.magnifications == [5.0, 10.0, 20.0]
    check_folds_and_summary(workdir, "cma_mil", list(sheet["slide_id"]))
    _, ckpt = load_checkpoint(res / "models" / "cma_mil" / "fold_0" / "model.pt")
    assert ckpt["bag_type"] == "multiscale" and ckpt["model_kwargs"]["magnifications"] == [5.0, 10.0, 20.0]
    for sid in shown:
        assert (res / "heatmaps" / "cma_mil" / f"{sid}.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def multistain_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e_multistain")
    # 14 slides: every patient has HE and IHC, two of them two HE slides; 6 x 6 tiles of 112 px at 20x.
    sheet = relative_sheet(workdir, make_cohort(workdir / "cohort", n_patients=6, size=768, seed=1,
                                                stains=["HE", "IHC"], slices_per_stain=(1, 2)))
    write_config(workdir, tiling={"tile_size": 112},
                 training={"model": "hier_multistain", "epochs": 4, "patience": 2,
                           "model_kwargs": {"hidden": 32, "attn_dim": 16, "per_slice_cap": 8}})
    # Heatmaps (patch attention and stain / slice weights) of an IHC slide of each label.
    ihc = sheet[sheet["stain"] == "IHC"]
    shown = [ihc.loc[ihc["label"] == label, "slide_id"].iloc[0] for label in ("normal", "tumour")]
    targets = ["results/summary/hier_multistain/summary.csv",
               *(f"results/heatmaps/hier_multistain/{sid}.png" for sid in shown)]
    t0 = time.perf_counter()
    snakemake(workdir, "--cores", "2", *targets)
    return workdir, sheet, shown, time.perf_counter() - t0


def test_hier_multistain_end_to_end(multistain_run, record_property):
    workdir, sheet, shown, seconds = multistain_run
    record_property("seconds", seconds)
    print(f"hier_multistain end to end: {len(sheet)} slides of {sheet['patient_id'].nunique()} patients, "
          f"{seconds:.0f} s")
    assert set(sheet["stain"]) == {"HE", "IHC"} and sheet.groupby(["patient_id", "stain"]).size().max() == 2
    res = workdir / "results"
    for sid in sheet["slide_id"]:  # the IHC scheme passes the tissue filter
        assert pd.read_parquet(res / "tissue" / sid / "tiles.parquet")["keep"].sum() >= 4, sid
    patients = sorted(sheet["patient_id"].unique())
    oof = check_folds_and_summary(workdir, "hier_multistain", patients)  # one prediction per patient
    assert (oof["slide_id"] == oof["patient_id"]).all()
    labels = sheet.drop_duplicates("patient_id").set_index("patient_id")["label"]
    assert (oof.set_index("slide_id")["label"] == labels.loc[oof["slide_id"]]).all()
    _, ckpt = load_checkpoint(workdir / "results" / "models" / "hier_multistain" / "fold_0" / "model.pt")
    assert ckpt["bag_type"] == "hierarchical" and isinstance(ckpt["state_dict"]["classifier.1.weight"], torch.Tensor)
    for sid in shown:
        assert (workdir / "results" / "heatmaps" / "hier_multistain" / f"{sid}.png").stat().st_size > 10_000
