"""End-to-end Snakemake runs: the shared small run (tests/smallrun.py) checked and extended, and a
real slide from ../shared. (`snakemake --lint`: tests/test_conventions.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from slidesnake.store import open_store
from conftest import REPO

K = 3


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_config(workdir: Path, **overrides) -> None:
    cfg = {
        "samples": "cohort/samples.tsv",
        "classes": ["normal", "tumour"],
        "splits": {"k": K},
        "features": {"backbone": "resnet18_trunc", "batch_size": 16, "num_workers": 0},
        "training": {"epochs": 8, "patience": 3, "min_epochs": 2},
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def run(small_run, tmp_path_factory):
    """The shared small run (tests/smallrun.py), copied: the tests below add targets to it. The dry
    run is of the same cohort and config before anything ran."""
    import shutil

    from smallrun import make_small_cohort

    fresh = tmp_path_factory.mktemp("e2e_plan")
    make_small_cohort(fresh)
    dry = snakemake(fresh, "-n")
    workdir = tmp_path_factory.mktemp("e2e") / "run"
    shutil.copytree(small_run, workdir, symlinks=True)
    sheet = pd.read_csv(workdir / "cohort" / "samples.tsv", sep="\t", dtype=str)
    return workdir, sheet, dry.stdout + dry.stderr


def job_counts(text: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table of a dry run as {rule: count}."""
    lines = text.split("Job stats:", 1)[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_dry_run_lists_every_rule(run):
    _, sheet, dry = run
    n = len(sheet)
    assert job_counts(dry) == {"tile": n, "filter_tissue": n, "extract_features": n, "make_splits": 1,
                               "train": K, "summarize": 1, "heatmap": n, "qc_table": 1, "run_summary": 1,
                               "excluded_table": 1, "all": 1}


def test_every_output_present_and_well_formed(run):
    workdir, sheet, _ = run
    res = workdir / "results"
    for sid in sheet["slide_id"]:
        tiles = pd.read_parquet(res / "tissue" / sid / "tiles.parquet")
        kept = tiles[tiles["keep"]]
        store = open_store(res / "features" / "resnet18_trunc" / f"{sid}.zarr")
        assert store.features(20).shape == (len(kept), 256)
        assert np.array_equal(store.coords(20), kept[["x", "y"]].to_numpy())
        assert np.array_equal(store.tile_ids(20), kept["tile_id"].to_numpy())
        assert store.attrs["backbone"] == "resnet18_trunc" and store.attrs["weights"] == "none"
        assert (res / "qc" / sid / "thumbnail.png").stat().st_size > 0
        assert (res / "heatmaps" / "abmil" / f"{sid}.png").stat().st_size > 10_000
        assert (res / "logs" / "tile" / f"{sid}.log").exists()
        assert (res / "benchmarks" / "tile" / f"{sid}.tsv").exists()
    # No temporary leftovers anywhere.
    assert not [p for p in res.rglob(".tmp-*")]


def test_folds_patient_disjoint_and_summary_complete(run):
    workdir, sheet, _ = run
    splits = pd.read_csv(workdir / "results" / "splits" / "splits.csv", dtype=str)
    for fold, g in splits.groupby("fold"):
        parts = [set(g.loc[g["split"] == s, "patient_id"]) for s in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), fold
    tested = splits[splits["split"] == "test"]["slide_id"]
    assert sorted(tested) == sorted(sheet["slide_id"])  # every slide tested exactly once
    summary = pd.read_csv(workdir / "results" / "summary" / "abmil" / "summary.csv", dtype={"fold": str})
    assert set(summary["fold"]) == {*map(str, range(K)), "mean", "sd"}
    assert summary[["auc", "balanced_accuracy", "f1"]].notna().all().all()
    oof = pd.read_csv(workdir / "results" / "summary" / "abmil" / "predictions.csv")
    assert sorted(oof["slide_id"]) == sorted(sheet["slide_id"])
    for fold in range(K):
        hist = pd.read_csv(workdir / "results" / "models" / "abmil" / f"fold_{fold}" / "history.csv")
        assert len(hist) >= 2 and hist["val_loss"].notna().all()


def test_rerun_does_nothing(run):
    workdir, _, _ = run
    out = snakemake(workdir, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr


def _report_entry(html: str, path: str) -> bytes:
    """The content of ``path`` as embedded (a base64 data URI) in a Snakemake HTML report."""
    import base64
    import re

    m = re.search(re.escape(f'"{path}": {{') + r'.*?"data_uri": "data:[^"]*?base64,([^"]+)"', html, re.S)
    assert m, f"{path} is not in the report"
    return base64.b64decode(m.group(1))


@pytest.mark.slow
def test_report_has_the_summary_tables_and_heatmaps(run):
    workdir, sheet, _ = run
    snakemake(workdir, "--report", "report.html")
    html = (workdir / "report.html").read_text()
    res = workdir / "results"
    # self-contained: every result embedded, byte for byte
    for rel in ("summary/abmil/summary.csv", "run_summary/slides.tsv", "run_summary/stages.tsv",
                "qc/slides.tsv"):
        assert _report_entry(html, f"results/{rel}") == (res / rel).read_bytes(), rel
    heatmaps = [sid for sid in sheet["slide_id"] if f'"results/heatmaps/abmil/{sid}.png"' in html]
    assert len(heatmaps) == len(sheet)
    assert _report_entry(html, f"results/heatmaps/abmil/{heatmaps[0]}.png").startswith(b"\x89PNG")
    assert _report_entry(html, "results/summary/abmil/roc.png").startswith(b"\x89PNG")
    # captions and categories from workflow/report/
    for text in ("Attention of the out-of-fold", "Cohort metrics", "Time per stage", "Heatmaps",
                 "Run summary", "Tissue QC"):
        assert text in html, text


def test_heatmap_tile_scores_exports_and_localisation(run):
    import json

    workdir, sheet, _ = run
    res = workdir / "results"
    hm = res / "heatmaps" / "abmil"
    for sid in sheet["slide_id"]:
        tiles = pd.read_csv(hm / f"{sid}.tiles.csv", dtype={"slide_id": str})
        store = open_store(res / "features" / "resnet18_trunc" / f"{sid}.zarr")
        assert list(tiles.columns[:9]) == ["slide_id", "tile_id", "magnification", "x", "y", "w", "h",
                                           "attention", "attention_norm"]
        assert np.array_equal(tiles[["x", "y"]].to_numpy(), store.coords(20))
        assert np.array_equal(tiles["tile_id"].to_numpy(), store.tile_ids(20))
        assert tiles["attention"].sum() == pytest.approx(1.0, abs=1e-3)  # softmax over the bag
        assert tiles["attention_norm"].between(0, 1).all()
        # QuPath detections: polygons of the level-0 tile boxes, round-tripping to the store's coords
        gj = json.loads((hm / f"{sid}.geojson").read_text())
        assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(tiles)
        ring = np.array([f["geometry"]["coordinates"][0] for f in gj["features"]])  # (N, 5, 2)
        assert np.array_equal(ring[:, 0], store.coords(20))
        assert np.array_equal(ring[:, 2] - ring[:, 0], store.size(20))
        props = gj["features"][0]["properties"]
        assert props["objectType"] == "detection"
        assert props["measurements"]["attention"] == pytest.approx(tiles["attention"].iloc[0])
        assert (hm / f"{sid}.top_tiles.png").read_bytes().startswith(b"\x89PNG")
    # localisation against the planted tumours (only a target when heatmap.annotations is set)
    target = "results/heatmaps/abmil/localisation.csv"
    snakemake(workdir, "--cores", "1", target, "--config", "heatmap={annotations: cohort/annotations}")
    loc = pd.read_csv(workdir / target, dtype={"slide_id": str})
    assert list(loc["slide_id"]) == [*sheet["slide_id"], "mean"]
    tumour = loc[loc["label"] == "tumour"]
    assert tumour["auc"].notna().any() and loc.loc[loc["label"] == "normal", "auc"].isna().all()
    assert 0 <= loc["auc"].iloc[-1] <= 1


@pytest.mark.slow
def test_real_slide_tiles_and_extracts(tmp_path, cmu_small):
    (tmp_path / "samples.tsv").write_text(
        "slide_id\tpatient_id\tlabel\tpath\n"
        f"CMU-1-Small\tP1\ttumour\t{cmu_small}\n")
    write_config(tmp_path, samples="samples.tsv")
    target = "results/features/resnet18_trunc/CMU-1-Small.zarr"
    snakemake(tmp_path, "--cores", "2", target)
    meta = yaml.safe_load((tmp_path / "results" / "tiles" / "CMU-1-Small" / "slide.json").read_text())
    assert meta["vendor"] == "aperio" and meta["mpp"] == pytest.approx(0.499)
    assert meta["objective_power"] == 20 and meta["mpp_source"] == "openslide.mpp-x"
    store = open_store(tmp_path / target)
    kept = pd.read_parquet(tmp_path / "results" / "tissue" / "CMU-1-Small" / "tiles.parquet")["keep"].sum()
    assert store.features(20).shape == (kept, 256) and kept >= 40
    assert np.isfinite(store.features(20)).all()
