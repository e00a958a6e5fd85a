"""Tiling and tissue QC through Snakemake on a small cohort of real slides plus broken ones."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from slidesnake.demo import write_slide
from slidesnake.store import open_store
from conftest import shared_slide
from test_workflow import snakemake

pytestmark = pytest.mark.slow  # left out of make test-fast

GOOD = {"CMU": ("real/aperio/CMU-1-Small-Region.svs", "tumour", ""),
        "TCGA": ("real/aperio/tcga-cr-7395-01a-01-ts1.svs", "normal", "0.5")}  # no MPP: sheet override
BAD = {"BAD1": ("bad/openslide-python/unopenable.tiff", "tumour", ""),    # does not open
       "BAD2": ("bad/openslide-python/unreadable.svs", "normal", "")}     # opens, pixels fail


def write_sheet(workdir, rows):
    lines = ["slide_id\tpatient_id\tlabel\tpath\tmpp"]
    lines += [f"{sid}\tP{i}\t{label}\t{path}\t{mpp}" for i, (sid, (path, label, mpp)) in enumerate(rows.items())]
    (workdir / "samples.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiling_e2e")
    good = {sid: (str(shared_slide(rel)), label, mpp) for sid, (rel, label, mpp) in GOOD.items()}
    bad = {sid: (str(shared_slide(rel)), label, mpp) for sid, (rel, label, mpp) in BAD.items()}
    # A slide of blank glass: recorded as "no tissue", and the chain after it must survive that.
    write_slide(work / "blank.svs", 1200, 1000, lambda x, y, w, h, ds: np.full((h, w, 3), 242, np.uint8))
    good["BLANK"] = (str(work / "blank.svs"), "normal", "")
    write_sheet(work, {**good, **bad})
    (work / "config.yaml").write_text(yaml.safe_dump({
        "samples": "samples.tsv", "classes": ["normal", "tumour"], "splits": {"k": 3},
        "tiling": {"magnifications": [10, "0.5um"]},  # 0.5 um/px is named 20x
        "features": {"backbone": "resnet18_trunc", "batch_size": 16, "num_workers": 0},
        "export_tiles": {"enabled": True},
    }))
    targets = [f"results/qc/{s}/qc.json" for s in [*good, *bad]]
    targets += ["results/patches/patches_20x/tumour/CMU", "results/features/resnet18_trunc/BLANK.zarr"]
    proc = snakemake(work, "--cores", "2", "--keep-going", *targets, check=False)
    return work, good, bad, proc


def test_bad_slides_fail_with_one_line_and_the_rest_completes(cohort):
    work, good, bad, proc = cohort
    assert proc.returncode != 0  # the bad slides failed ...
    res = work / "results"
    for sid in good:  # ... and every good slide went through
        for out in (f"tiles/{sid}/grid.parquet", f"tiles/{sid}/slide.json", f"tissue/{sid}/tiles.parquet",
                    f"qc/{sid}/thumbnail.png", f"qc/{sid}/tissue.geojson", f"qc/{sid}/qc.json"):
            assert (res / out).stat().st_size > 0, out
    for sid, why in (("BAD1", "cannot be opened"), ("BAD2", "pixel data cannot be read")):
        log = (work / "results/logs/tile" / f"{sid}.log").read_text()
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and f"slide '{sid}'" in errors[0] and why in errors[0], log
        assert "Traceback" not in log
        assert not (res / "tiles" / sid).exists()


def test_levels_tile_sizes_and_qc_records(cohort):
    work, _, _, _ = cohort
    res = work / "results"
    cmu = json.loads((res / "qc" / "CMU" / "qc.json").read_text())
    tcga = json.loads((res / "qc" / "TCGA" / "qc.json").read_text())
    assert cmu["status"] == tcga["status"] == "ok"
    assert (cmu["mpp_source"], tcga["mpp_source"]) == ("openslide.mpp-x", "sample sheet mpp column")
    for qc in (cmu, tcga):
        for key, um in (("10", 224), ("20", 112)):
            m = qc["magnifications"][key]
            assert m["tile_um"] == pytest.approx(um, rel=0.01)  # both are ~0.5 um/px at 20x
            assert m["tiles"] >= m["kept"] > 0 and m["dz_downsample"] == 20 // int(key)
        assert qc["magnifications"]["20"]["target"] == "0.5um"
    tiles = pd.read_parquet(res / "tissue" / "CMU" / "tiles.parquet")
    assert {"parent_10x", "edge_score", "tissue_fraction", "ink_fraction", "keep"} <= set(tiles.columns)
    assert cmu["magnifications"]["20"]["kept"] == tiles.loc[tiles["magnification"] == 20, "keep"].sum()
    gj = json.loads((res / "qc" / "CMU" / "tissue.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    assert all(f["properties"]["objectType"] == "annotation" for f in gj["features"])
    thumb = Image.open(res / "qc" / "CMU" / "thumbnail.png")
    assert thumb.size[0] > 2 * 700  # one panel per magnification


def test_no_tissue_slide_recorded_and_downstream_survives(cohort):
    work, _, _, _ = cohort
    res = work / "results"
    qc = json.loads((res / "qc" / "BLANK" / "qc.json").read_text())
    assert qc["status"] == "no tissue" and all(m["kept"] == 0 for m in qc["magnifications"].values())
    assert not pd.read_parquet(res / "tissue" / "BLANK" / "tiles.parquet")["keep"].any()
    store = open_store(res / "features" / "resnet18_trunc" / "BLANK.zarr")
    assert store.features(20).shape[0] == 0


def test_tile_export_layout(cohort):
    work, _, _, _ = cohort
    out = work / "results" / "patches" / "patches_20x" / "tumour" / "CMU"
    tiles = pd.read_parquet(work / "results" / "tissue" / "CMU" / "tiles.parquet")
    kept = tiles[(tiles["magnification"] == 20) & tiles["keep"]]
    files = sorted(p.name for p in out.glob("*.jpeg"))
    assert files == sorted(f"{c}_{r}.jpeg" for c, r in kept[["col", "row"]].to_numpy())
    assert Image.open(out / files[0]).size == (224, 224)


def test_cohort_qc_table_and_rule_all(cohort):
    work, good, _, _ = cohort
    write_sheet(work, good)  # the bad slides dropped from the sheet
    # Three patients (normal 2, tumour 1) cannot make splits.k = 3 folds: `all` is refused while the
    # workflow is parsed, in one line naming the key; the per-slide and QC targets still plan.
    dry = snakemake(work, "-n", check=False)
    assert dry.returncode != 0 and "config splits.k: 3 folds need 3 patients" in dry.stdout + dry.stderr
    dry = snakemake(work, "-n", "results/qc/slides.tsv")
    assert "rule qc_table:" in dry.stdout + dry.stderr
    snakemake(work, "--cores", "1", "results/qc/slides.tsv")
    table = pd.read_csv(work / "results" / "qc" / "slides.tsv", sep="\t")
    assert sorted(table["slide_id"]) == sorted(good)
    row = table.set_index("slide_id")
    assert row.loc["BLANK", "status"] == "no tissue" and row.loc["CMU", "status"] == "ok"
    assert row.loc["CMU", "kept_20x"] > 40 and row.loc["CMU", "tiles_20x"] == 117
    assert row.loc["TCGA", "mpp"] == 0.5 and row.loc["TCGA", "objective_source"].startswith("derived")
