"""Bad input and faults: a generated corruption suite through real Snakemake runs in both
``on_bad_slide`` modes, and the numerical guards (NaN / Inf features, non-finite losses).

One cohort: 6 good patients (one tiny generated slide each, k = 3 folds) and, attached to those
patients (so the folds stay those of the good ones), slides broken in every way we know:
random bytes named .svs, a zero-byte file, a generated slide truncated at 10%, 50% and 90% of its
size, one with a bogus JPEG tile (found with tifffile), a TIFF without MPP, a blank (no tissue)
slide, a slide deleted after a first run, and the broken files of ../shared/data/slides/bad/.
The ``fail`` run (``--keep-going``, up to the feature stores) and then the ``skip`` run (all) share
one working directory: switching the mode reruns only the jobs that failed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from conftest import SHARED_SLIDES
from slidesnake.bags import ExcludedBag, NonFiniteError, NonFiniteLossError
from slidesnake.demo import make_cohort, write_slide
from slidesnake.exclusion import excluded_table, record
from slidesnake.features import extract_slide
from slidesnake.slide import SlideError, open_slide, resolve_resolution
from slidesnake.store import open_store, write_excluded_store, write_store
from slidesnake.tiling import build_grid
from slidesnake.training import load_bags, train_fold
from test_workflow import snakemake, write_config

BB = "resnet18_trunc"
# bad slide -> (stages that may exclude it, words its reason must hold)
EXPECTED = {
    "RANDOM": ({"tile"}, "cannot be opened"),
    "EMPTY": ({"tile"}, "empty (0 bytes)"),
    "TRUNC10": ({"tile"}, "file is truncated ("),
    "TRUNC50": ({"tile"}, "file is truncated ("),
    "TRUNC90": ({"tile"}, "file is truncated ("),
    "BOGUS": ({"tile", "filter_tissue"}, "pixel data cannot be read"),
    "NOMPP": ({"tile"}, "no microns-per-pixel"),
    "BLANK": ({"filter_tissue"}, "no tissue"),
    "VANISH": ({"tile"}, "file not found"),
    "UNOPENABLE": ({"tile"}, "cannot be opened"),
    "UNREADABLE": ({"tile"}, "pixel data cannot be read"),
}
SHARED_BAD = {"UNOPENABLE": "bad/openslide-python/unopenable.tiff",
              "UNREADABLE": "bad/openslide-python/unreadable.svs"}


# ------------------------------------------------------------------------------ corruptions

def bogus_tile(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose level-0 tile (1, 1) (off the centre that check_readable decodes) is
    overwritten with zeros at its TileOffsets: its JPEG stream no longer starts with a marker."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        per_row = math.ceil(page.imagewidth / page.tilewidth)
        k = per_row + 1
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(dst, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * count)
    return dst


def no_mpp_tiff(path: Path) -> Path:
    """A tiled JPEG TIFF (OpenSlide: generic-tiff) with tissue-like pixels but no resolution unit,
    MPP or objective power."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(180, 40, (768, 768, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="jpeg")
    return path


def blank_slide(path: Path) -> Path:
    write_slide(path, 1200, 1000, lambda x, y, w, h, ds: np.full((h, w, 3), 242, np.uint8))
    return path


@pytest.fixture(scope="module")
def good_cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """6 generated good slides (one per patient, 3 per class)."""
    root = tmp_path_factory.mktemp("bad_input_cohort")
    sheet = make_cohort(root, n_patients=6, slides_per_patient=(1, 1), size=1200, seed=5)
    return root, sheet


def bad_slides(good: pd.DataFrame, bad_dir: Path) -> dict[str, Path]:
    bad_dir.mkdir(parents=True, exist_ok=True)
    src = Path(good["path"].iloc[0])
    data = src.read_bytes()
    out = {"RANDOM": bad_dir / "random.svs", "EMPTY": bad_dir / "empty.svs"}
    out["RANDOM"].write_bytes(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    out["EMPTY"].write_bytes(b"")
    for pct in (10, 50, 90):
        out[f"TRUNC{pct}"] = bad_dir / f"trunc{pct}.svs"
        out[f"TRUNC{pct}"].write_bytes(data[: len(data) * pct // 100])
    out["BOGUS"] = bogus_tile(Path(good["path"].iloc[1]), bad_dir / "bogus.svs")
    out["NOMPP"] = no_mpp_tiff(bad_dir / "nompp.tif")
    out["BLANK"] = blank_slide(bad_dir / "blank.svs")
    out["VANISH"] = bad_dir / "vanish.svs"
    shutil.copy(good["path"].iloc[2], out["VANISH"])
    for sid, rel in SHARED_BAD.items():
        if (SHARED_SLIDES / rel).exists():
            out[sid] = SHARED_SLIDES / rel
    return out


# ------------------------------------------------------------------------------ the two runs

def _error_lines(work: Path, sid: str) -> tuple[list[str], str]:
    logs = [work / "results/logs/tile" / f"{sid}.log", work / "results/logs/filter_tissue" / f"{sid}.log",
            work / "results/logs/extract_features" / BB / f"{sid}.log"]
    text = "\n".join(p.read_text() for p in logs if p.exists())
    return [line for line in text.splitlines() if " ERROR " in line], text


@pytest.fixture(scope="module")
def runs(good_cohort, tmp_path_factory):
    root, good = good_cohort
    work = tmp_path_factory.mktemp("bad_input_run")
    cohort = work / "cohort"
    shutil.copytree(root, cohort)
    good = good.assign(path=[str(cohort / "slides" / Path(p).name) for p in good["path"]])
    bad = bad_slides(good, cohort / "bad")
    # every bad slide belongs to one of the good patients (and has its label)
    rows = [dict(slide_id=sid, patient_id=good["patient_id"].iloc[i % 6], label=good["label"].iloc[i % 6],
                 path=str(path), stain="", mpp="") for i, (sid, path) in enumerate(bad.items())]
    sheet = pd.concat([good, pd.DataFrame(rows)], ignore_index=True)
    sheet.to_csv(cohort / "samples.tsv", sep="\t", index=False)
    write_config(work, on_bad_slide="fail", features={"device": "cpu"},
                 training={"epochs": 2, "patience": 2, "min_epochs": 1, "device": "cpu"},
                 tissue={"thumbnail_size": 256}, heatmap={"thumbnail_size": 256, "top_k": 2})

    # fail: every bad slide's job fails with one line, --keep-going finishes the good ones (BLANK is
    # no failure in this mode, test_tiling_workflow covers it; it is first met in the skip run)
    stores = [f"results/features/{BB}/{s}.zarr" for s in sheet["slide_id"] if s != "BLANK"]
    fail = snakemake(work, "--cores", "2", "--keep-going", *stores, check=False)
    fail_logs = {sid: _error_lines(work, sid) for sid in bad}
    fail_stores = {}
    for s in [*good["slide_id"], "VANISH"]:
        store = open_store(work / f"results/features/{BB}/{s}.zarr")
        fail_stores[s] = (store.excluded, store.n_tiles(20))
    fail_stores.update({s: None for s in bad if not (work / f"results/features/{BB}/{s}.zarr").exists()})
    good_mtimes = {s: (work / f"results/features/{BB}/{s}.zarr").stat().st_mtime_ns for s in good["slide_id"]}

    # the slide vanishes after a run that validated (and processed) it
    bad["VANISH"].unlink()
    missing = snakemake(work, "-n", check=False)

    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["on_bad_slide"] = "skip"
    cfg["heatmap"]["pyramid"] = True  # the optional pyramidal heatmaps too, placeholders for excluded slides
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    skip = snakemake(work, "--cores", "2", check=False)
    return dict(work=work, good=list(good["slide_id"]), bad=bad, sheet=sheet, fail=fail, fail_logs=fail_logs,
                fail_stores=fail_stores,
                missing=missing, skip=skip, good_mtimes=good_mtimes)


@pytest.mark.slow
def test_fail_mode_one_line_per_bad_slide_and_good_slides_finish(runs):
    work, fail = runs["work"], runs["fail"]
    assert fail.returncode != 0
    for sid in runs["good"] + ["VANISH"]:
        excluded, n_tiles = runs["fail_stores"][sid]
        assert excluded is None and n_tiles > 0, sid
    for sid, path in runs["bad"].items():
        if sid in ("BLANK", "VANISH"):
            continue
        errors, text = runs["fail_logs"][sid]
        assert len(errors) == 1, (sid, text)
        stages, words = EXPECTED[sid]
        words = (words,) if isinstance(words, str) else words
        assert f"slide '{sid}' ({path}):" in errors[0] and any(w in errors[0] for w in words), errors[0]
        assert "; " in errors[0].split(f"({path}): ", 1)[1]  # problem; fix
        assert "Traceback" not in text, text
        assert runs["fail_stores"][sid] is None  # no feature store
        print(f"{sid}: {errors[0].split(' ERROR ', 1)[1]}")


@pytest.mark.slow
def test_fail_mode_missing_file_is_a_sheet_error(runs):
    out = runs["missing"].stdout + runs["missing"].stderr
    assert runs["missing"].returncode != 0
    assert "slide 'VANISH'" in out and "not found" in out, out[-3000:]


@pytest.mark.slow
def test_skip_mode_completes_and_lists_every_bad_slide(runs):
    work, skip = runs["work"], runs["skip"]
    assert skip.returncode == 0, skip.stderr[-6000:]
    table = pd.read_csv(work / "results/qc/excluded.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["slide_id", "patient_id", "path", "stage", "reason", "fix"]
    assert sorted(table["slide_id"]) == sorted(runs["bad"]), table
    sheet = runs["sheet"].set_index("slide_id")
    for r in table.itertuples(index=False):
        stages, words = EXPECTED[r.slide_id]
        words = (words,) if isinstance(words, str) else words
        assert r.stage in stages and any(w in r.reason for w in words), r
        assert r.fix and r.path == sheet.loc[r.slide_id, "path"]
        assert r.patient_id == sheet.loc[r.slide_id, "patient_id"]
    print("\n" + table[["slide_id", "stage", "reason"]].to_string(index=False))


@pytest.mark.slow
def test_skip_mode_keeps_every_good_slide(runs):
    work, good = runs["work"], runs["good"]
    # the good slides' jobs of the fail run were not rerun
    for s in good:
        assert (work / f"results/features/{BB}/{s}.zarr").stat().st_mtime_ns == runs["good_mtimes"][s], s
    oof = pd.read_csv(work / "results/summary/abmil/predictions.csv", dtype={"slide_id": str})
    assert sorted(oof["slide_id"]) == sorted(good)
    splits = pd.read_csv(work / "results/splits/splits.csv", dtype={"slide_id": str})
    # excluded slides hold no place in the folds: make_splits leaves them out, each with its reason
    assert set(splits["slide_id"]) == set(good)
    log = (work / "results/logs/make_splits.log").read_text()
    for sid in runs["bad"]:
        assert f"not in the folds: {sid} (excluded at " in log, (sid, log)
    for k in range(3):
        pred = pd.read_csv(work / f"results/models/abmil/fold_{k}/predictions.csv", dtype={"slide_id": str})
        rows = splits[splits["fold"] == k]
        assert set(pred["slide_id"]) == set(rows["slide_id"])
    for s in good:
        tiles = pd.read_csv(work / f"results/heatmaps/abmil/{s}.tiles.csv")
        assert len(tiles) > 0
    slides = pd.read_csv(work / "results/run_summary/slides.tsv", sep="\t").set_index("slide_id")
    assert (slides.loc[good, "status"] == "included").all()
    assert (slides.loc[list(runs["bad"]), "status"] == "excluded").all()
    assert slides.loc["VANISH", "reason"] == "tile: file not found"


@pytest.mark.slow
def test_skip_mode_marks_outputs_and_placeholders(runs):
    work = runs["work"]
    res = work / "results"
    meta = json.loads((res / "tiles/RANDOM/slide.json").read_text())
    assert meta["excluded"]["stage"] == "tile" and "cannot be opened" in meta["excluded"]["reason"]
    assert len(pd.read_parquet(res / "tiles/RANDOM/grid.parquet")) == 0
    qc = json.loads((res / "qc/RANDOM/qc.json").read_text())
    assert qc["status"] == "excluded" and qc["excluded"] == meta["excluded"]
    blank = json.loads((res / "qc/BLANK/qc.json").read_text())
    assert blank["status"] == "no tissue" and blank["excluded"]["stage"] == "filter_tissue"
    store = open_store(res / f"features/{BB}/BLANK.zarr")
    assert store.excluded == blank["excluded"] and store.magnifications == []
    qc_table = pd.read_csv(res / "qc/slides.tsv", sep="\t").set_index("slide_id")
    assert qc_table.loc["EMPTY", "status"] == "excluded" and qc_table.loc[runs["good"], "status"].eq("ok").all()
    # heatmap placeholders of an excluded slide
    tiles = pd.read_csv(res / "heatmaps/abmil/EMPTY.tiles.csv")
    assert len(tiles) == 0 and "attention" in tiles.columns
    assert json.loads((res / "heatmaps/abmil/EMPTY.geojson").read_text()) == {"type": "FeatureCollection",
                                                                              "features": []}
    png = Image.open(res / "heatmaps/abmil/EMPTY.png")
    assert png.size == (720, 160) and np.asarray(png.convert("L")).min() < 128  # dark text on white
    log = (work / "results/logs/tile/EMPTY.log").read_text()
    assert "WARNING" in log and "excluded at tile: file is empty (0 bytes)" in log and "ERROR" not in log
    # heatmap.pyramid: the excluded slide (which does not even open) gets a blank placeholder TIFF,
    # a good slide its heatmap on its own level-0 grid
    import openslide

    with openslide.OpenSlide(res / "heatmaps/abmil/EMPTY.heatmap.svs") as placeholder:
        assert placeholder.dimensions == (256, 256)
    good = runs["good"][0]
    with openslide.OpenSlide(res / f"heatmaps/abmil/{good}.heatmap.svs") as hm, \
            openslide.OpenSlide(runs["sheet"].set_index("slide_id").loc[good, "path"]) as slide:
        assert hm.dimensions == slide.dimensions


# ------------------------------------------------------------------------------ unit level

def _tiles(path: Path, slide_id: str) -> pd.DataFrame:
    slide = open_slide(path, slide_id)
    grid, _ = build_grid(slide, resolve_resolution(slide.properties, slide_id, path), [20], 224)
    return grid.assign(keep=True)


@pytest.mark.parametrize("workers", [0, 1])
def test_decode_error_mid_extraction_is_one_slide_error(good_cohort, tmp_path, workers):
    _, good = good_cohort
    bogus = bogus_tile(Path(good["path"].iloc[1]), tmp_path / "bogus.svs")
    out = tmp_path / "bogus.zarr"
    with pytest.raises(SlideError) as err:
        extract_slide(bogus, _tiles(bogus, "BOGUS"), out, slide_id="BOGUS", backbone=BB, tile_size=224,
                      limit_bounds=False, batch_size=4, num_workers=workers, device="cpu", threads=1)
    assert str(err.value).startswith(f"slide 'BOGUS' ({bogus}): pixel data cannot be read (")
    assert "\n" not in str(err.value) and err.value.fix
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_nan_features_at_extraction_name_slide_and_magnification(good_cohort, tmp_path):
    from slidesnake.backbones import create_backbone

    _, good = good_cohort
    state = create_backbone(BB, "none").model.state_dict()
    first = next(k for k, v in state.items() if v.dtype.is_floating_point and v.ndim == 4)
    state[first] = torch.full_like(state[first], float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    path = Path(good["path"].iloc[0])
    out = tmp_path / "s.zarr"
    with pytest.raises(SlideError, match=r"non-finite \(NaN/Inf\) features at 20x") as err:
        extract_slide(path, _tiles(path, "S"), out, slide_id="S", backbone=BB, weights=str(tmp_path / "nan.pth"),
                      tile_size=224, limit_bounds=False, batch_size=8, num_workers=0, device="cpu", threads=1)
    assert str(err.value).startswith(f"slide 'S' ({path}):") and "features.weights" in str(err.value)
    assert not out.exists()


def _store(path: Path, sid: str, feats: np.ndarray) -> Path:
    n = len(feats)
    write_store(path / f"{sid}.zarr", {"slide_id": sid}, {20.0: {
        "features": feats, "coords": np.zeros((n, 2)), "size": np.full((n, 2), 224), "grid": np.zeros((n, 2)),
        "tile_id": np.arange(n)}}, feature_dtype="float32")
    return path / f"{sid}.zarr"


def test_nan_features_at_training_load_name_the_slide(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 8)).astype(np.float32)
    feats[2, 3] = np.inf
    stores = [_store(tmp_path, "good", rng.normal(size=(5, 8))), _store(tmp_path, "bad", feats)]
    with pytest.raises(NonFiniteError, match=r"slide 'bad' .*: 1 of 5 tiles have non-finite \(NaN/Inf\) "
                                             r"features at 20x"):
        load_bags(stores, 20)


def test_excluded_and_empty_bags_left_out_with_reason(tmp_path, caplog):
    rng = np.random.default_rng(0)
    rows, stores, splits = [], [], ["train"] * 5 + ["val"] * 2 + ["test"] * 2
    for i in range(9):
        sid = f"s{i}"
        stores.append(_store(tmp_path, sid, rng.normal(size=(4, 8)) + (i % 2)))
        rows.append(dict(fold=0, slide_id=sid, patient_id=f"p{i}", label=["neg", "pos"][i % 2], split=splits[i]))
    write_excluded_store(tmp_path / "s0.zarr", "s0", record("tile", "file is empty (0 bytes)", "re-copy it"))
    stores[8] = _store(tmp_path, "s8", np.zeros((0, 8), np.float32))
    with caplog.at_level(logging.WARNING):
        bags = load_bags(stores, 20)
        assert isinstance(bags["s0"], ExcludedBag)
        res = train_fold(bags, pd.DataFrame(rows), ["neg", "pos"], "abmil", {"hidden": 8}, epochs=1, device="cpu")
    assert res.skipped == ["s0", "s8"]
    assert "slide s0 excluded at tile: file is empty (0 bytes); skipped (train split" in caplog.text
    assert "slide s8 has an empty bag (0 tiles); skipped (test split" in caplog.text
    assert set(res.predictions["slide_id"]) == {f"s{i}" for i in range(1, 8)}
    sheet = pd.DataFrame({"slide_id": [f"s{i}" for i in range(9)], "patient_id": [f"p{i}" for i in range(9)],
                          "path": [f"/x/s{i}.svs" for i in range(9)]})
    table = excluded_table(sheet, {s: open_store(p) for s, p in zip(sheet["slide_id"], stores)}, [20])
    assert table["slide_id"].tolist() == ["s0", "s8"] and table["stage"].tolist() == ["tile", "filter_tissue"]
    assert table["reason"].iloc[1].startswith("no tissue tile at 20x")


def test_non_finite_loss_names_fold_epoch_and_slide():
    rng = np.random.default_rng(0)
    bags = {f"s{i}": rng.normal(size=(4, 8)).astype(np.float32) for i in range(6)}
    rows = pd.DataFrame([dict(fold=1, slide_id=f"s{i}", patient_id=f"p{i}", label=["neg", "pos"][i % 2],
                              split=["train", "train", "train", "train", "val", "test"][i]) for i in range(6)])
    # also a RuntimeError: tuning counts such a trial as diverged and goes on
    with pytest.raises(NonFiniteLossError,
                       match=r"^fold 1, epoch \d+: non-finite training loss \((nan|inf|-inf)\) on slide 's[0-3]'"):
        train_fold(bags, rows, ["neg", "pos"], "abmil", {"hidden": 8}, lr=1e30, epochs=20, patience=20,
                   device="cpu")


def test_one_line_errors_skip_excludes_and_fail_exits(caplog):
    from slidesnake.slide import one_line_errors

    log = logging.getLogger("slidesnake.test")
    err = SlideError("S1", "/data/s1.svs", "file is empty (0 bytes)", "re-copy the slide from its source")
    got = []
    with caplog.at_level(logging.WARNING):
        with one_line_errors(log, "skip", "tile", got.append):
            raise err
    assert got == [record("tile", "file is empty (0 bytes)", "re-copy the slide from its source")]
    assert "slide 'S1' (/data/s1.svs) excluded at tile: file is empty (0 bytes)" in caplog.text
    with pytest.raises(SystemExit) as exit_:
        with one_line_errors(log, "fail", "tile", got.append):
            raise err
    assert exit_.value.code == 1 and len(got) == 1
    assert caplog.records[-1].levelname == "ERROR" and caplog.records[-1].getMessage() == str(err)


def test_on_bad_slide_value_is_validated(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"samples": "samples.tsv", "classes": ["normal", "tumour"], "on_bad_slide": "sometimes"}))
    proc = snakemake(tmp_path, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "'sometimes' is not one of ['fail', 'skip']" in out, out[-2000:]


@pytest.mark.parametrize("bigtiff", [False, True])
def test_truncated_tiff_is_named_as_such(tmp_path, bigtiff):
    from slidesnake.demo import HEScene
    from slidesnake.slide import tiff_truncation

    full = tmp_path / "full.svs"
    write_slide(full, 1200, 1000, HEScene(1200, 1000, seed=1).render, bigtiff=bigtiff)
    assert tiff_truncation(full) is None
    open_slide(full, "full")
    data = full.read_bytes()
    for cut in (16, len(data) // 10, len(data) // 2, len(data) * 9 // 10, len(data) - 1):
        part = tmp_path / f"cut{cut}.svs"
        part.write_bytes(data[:cut])
        assert tiff_truncation(part).startswith(f"{cut} bytes, but "), cut
        with pytest.raises(SlideError, match=r"file is truncated \(.*\); re-copy the slide from its source"):
            open_slide(part, "cut")
