"""Synthetic demo cohort: Aperio SVS writer, procedural scene, cohort builder and CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest

from slidesnake.demo import HEScene, SAMPLE_COLUMNS, main, make_cohort, pyramid_levels, write_slide

W, H = 2560, 2048  # not square; level 2 (160 x 128) is smaller than a tile and must be dropped
COHORT = dict(n_patients=4, slides_per_patient=(1, 2), size=1024, seed=1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rgb(region) -> np.ndarray:
    return np.asarray(region.convert("RGB")).astype(np.float64)


def polygon_mask(features: list[dict], width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    for feature in features:
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        cv2.fillPoly(mask, [np.round((ring - 0.5) * 16).astype(np.int32)], 1, shift=4)
    return mask.astype(bool)


def centroid(ring: np.ndarray) -> tuple[float, float]:
    x, y = ring[:-1, 0], ring[:-1, 1]
    x2, y2 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y2 - x2 * y
    area = cross.sum() / 2
    return float(((x + x2) * cross).sum() / (6 * area)), float(((y + y2) * cross).sum() / (6 * area))


@pytest.fixture(scope="module")
def scene() -> HEScene:
    return HEScene(W, H, seed=11, n_regions=2, tumour_fraction=0.2)


@pytest.fixture(scope="module")
def slide_path(scene, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "scene.svs"
    write_slide(path, W, H, scene.render, mpp=0.25, objective=40)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    outdir = tmp_path_factory.mktemp("cohort") / "demo"
    return outdir, make_cohort(outdir, **COHORT)


# -- slide writer ------------------------------------------------------------------------------


def test_openslide_reads_aperio(slide_path):
    with openslide.OpenSlide(slide_path) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "aperio"
        assert props["openslide.comment"].startswith("Aperio Image Library")
        assert float(props["openslide.mpp-x"]) == 0.25
        assert float(props["openslide.mpp-y"]) == 0.25
        assert float(props["openslide.objective-power"]) == 40
        assert slide.dimensions == (W, H)
        assert slide.level_count == 2
        assert slide.level_dimensions == ((W, H), (W // 4, H // 4))
        assert slide.level_downsamples == pytest.approx((1.0, 4.0))
        thumb = slide.associated_images["thumbnail"]
        assert max(thumb.size) == 768 and thumb.size[0] > thumb.size[1]


def test_pyramid_levels_drop_small_levels():
    assert pyramid_levels(100_000, 80_000) == [(100_000, 80_000, 1), (25_000, 20_000, 4), (6250, 5000, 16)]
    assert pyramid_levels(W, H) == [(W, H, 1), (W // 4, H // 4, 4)]
    assert pyramid_levels(W, H, tile=128) == [(W, H, 1), (W // 4, H // 4, 4), (W // 16, H // 16, 16)]
    assert pyramid_levels(600, 600) == [(600, 600, 1)]
    with pytest.raises(ValueError):
        pyramid_levels(W, H, downsamples=(2, 4))


@pytest.mark.parametrize("level", [0, 1])
def test_colours_survive_jpeg(scene, slide_path, level):
    """Read-back matches the render: no channel swap, no YCbCr/RGB colour shift."""
    ds = 4 ** level
    with openslide.OpenSlide(slide_path) as slide:
        x, y = 512, 384  # glass, tissue edge, stroma and tumour
        size = (2048 // ds, 1536 // ds)
        got = rgb(slide.read_region((x, y), level, size))
    want = scene.render(x, y, size[0], size[1], ds).astype(np.float64)
    assert np.ptp(want.mean(2)) > 100  # the region has contrast worth checking
    assert np.abs(got - want).mean(axis=(0, 1)) == pytest.approx(0, abs=6)
    assert np.abs((got - want).mean(axis=(0, 1))).max() < 1.5
    for c in range(3):
        assert np.corrcoef(got[..., c].ravel(), want[..., c].ravel())[0, 1] > 0.95


def test_threaded_rendering_gives_the_same_bytes(scene, slide_path, tmp_path):
    write_slide(tmp_path / "threaded.svs", W, H, scene.render, mpp=0.25, objective=40, workers=2)
    assert sha256(tmp_path / "threaded.svs") == sha256(slide_path)


def test_streams_tiles_and_writes_atomically(tmp_path):
    calls = []

    def render(x, y, w, h, ds):
        calls.append((w, h))
        return np.full((h, w, 3), 200, dtype=np.uint8)

    levels = write_slide(tmp_path / "flat.svs", 1000, 700, render, tile=128)
    assert levels == [(1000, 700, 1), (250, 175, 4)]
    assert max(w * h for w, h in calls) <= 128 * 128  # never a whole level in memory
    with openslide.OpenSlide(tmp_path / "flat.svs") as slide:
        assert slide.level_count == 2
        assert np.abs(rgb(slide.read_region((900, 600), 0, (100, 100))) - 200).max() <= 2

    def broken(x, y, w, h, ds):
        if x > 500:
            raise RuntimeError("boom")
        return np.zeros((h, w, 3), dtype=np.uint8)

    with pytest.raises(RuntimeError):
        write_slide(tmp_path / "broken.svs", 1000, 700, broken, tile=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.svs"]


# -- scene -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ds", [1, 4, 2.5])
def test_render_is_seamless_across_tiles(scene, ds):
    # Tile origins as the writer uses them (multiples of the tile size); a tumour edge runs
    # through the block.
    step = int(256 * ds)
    x0 = (int(scene.regions[0][:, 0].min()) // step) * step
    y0 = (int(scene.regions[0][:, 1].mean()) // step) * step
    whole = scene.render(x0, y0, 512, 512, ds)
    mosaic = np.zeros_like(whole)
    for i in range(2):
        for j in range(2):
            mosaic[i * 256 : (i + 1) * 256, j * 256 : (j + 1) * 256] = scene.render(
                x0 + j * 256 * ds, y0 + i * 256 * ds, 256, 256, ds
            )
    np.testing.assert_array_equal(whole, mosaic)


def test_scene_layout(scene):
    assert 0.35 < scene.tissue_fraction < 0.65
    assert len(scene.regions) == 2
    assert 0.1 < scene.tumour_fraction <= 0.21
    tissue = scene.tissue_mask(0, 0, W // 4, H // 4, 4)
    tumour = scene.tumour_mask(0, 0, W // 4, H // 4, 4)
    assert tumour.any() and (tissue | ~tumour).mean() > 0.999  # tumour lies inside tissue
    assert not tissue[0].any() and not tissue[-1].any()  # tissue stays off the slide's edge


# -- cohort ------------------------------------------------------------------------------------


def test_sample_sheet(cohort):
    outdir, sheet = cohort
    assert list(sheet.columns) == SAMPLE_COLUMNS
    on_disk = pd.read_csv(outdir / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(on_disk, sheet.astype(str))
    assert sheet.slide_id.is_unique
    assert set(sheet.label) == {"normal", "tumour"}
    assert (sheet.groupby("patient_id").label.nunique() == 1).all()  # labels are per patient
    per_patient = sheet.groupby("patient_id").size()
    assert per_patient.max() == 2 and (per_patient == 2).sum() >= 2
    assert sheet.patient_id.nunique() == COHORT["n_patients"]
    assert (sheet.stain == "HE").all() and (sheet.mpp == "").all()
    for row in sheet.itertuples():
        assert row.path == os.path.join(outdir, "slides", f"{row.slide_id}.svs")
        assert Path(row.path).is_file()


def test_annotations(cohort):
    outdir, sheet = cohort
    for row in sheet.itertuples():
        fc = json.loads((outdir / "annotations" / f"{row.slide_id}.geojson").read_text())
        assert fc["type"] == "FeatureCollection"
        if row.label == "normal":
            assert fc["features"] == []
            continue
        assert 1 <= len(fc["features"]) <= 3
        for feature in fc["features"]:
            assert feature["type"] == "Feature"
            assert feature["geometry"]["type"] == "Polygon"
            ring = feature["geometry"]["coordinates"][0]
            assert ring[0] == ring[-1] and len(ring) > 10
            assert feature["properties"] == {
                "objectType": "annotation",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
            }


def test_planted_regions_look_like_tumour(cohort):
    outdir, sheet = cohort
    for row in sheet[sheet.label == "tumour"].itertuples():
        features = json.loads((outdir / "annotations" / f"{row.slide_id}.geojson").read_text())["features"]
        with openslide.OpenSlide(row.path) as slide:
            width, height = slide.dimensions
            image = rgb(slide.read_region((0, 0), 0, (width, height)))
            gray = image.mean(2)
            inside = polygon_mask(features, width, height)
            outside = ~cv2.dilate(inside.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
            stroma = outside & (gray < 225)  # tissue outside the polygons
            assert stroma.mean() > 0.2
            # Tumour is darker, more purple, and has many more nucleus-dark pixels.
            assert gray[stroma].mean() - gray[inside].mean() > 30
            ratio = image[..., 0] / image[..., 2]
            assert ratio[inside].mean() < ratio[stroma].mean() - 0.05
            dark_stroma = (gray[stroma] < 120).mean()
            # The polygon coordinates land on the planted texture: a tile at the centroid (224 px
            # or, for the small regions of these small slides, what fits inside the polygon).
            for feature in features:
                ring = np.asarray(feature["geometry"]["coordinates"][0])
                cx, cy = centroid(ring)
                side = min(224, int(0.9 * np.hypot(ring[:, 0] - cx, ring[:, 1] - cy).min()))
                assert side >= 64
                corner = (int(cx - side / 2), int(cy - side / 2))
                tile = rgb(slide.read_region(corner, 0, (side, side))).mean(2)
                assert tile.mean() < gray[stroma].mean() - 30
                assert (tile < 120).mean() > max(0.15, 4 * dark_stroma)


def test_same_seed_same_bytes(cohort, tmp_path):
    outdir, sheet = cohort
    again = make_cohort(tmp_path / "again", **COHORT)
    assert list(again.slide_id) == list(sheet.slide_id)
    for sub, ext in (("slides", "svs"), ("annotations", "geojson")):
        for slide_id in sheet.slide_id:
            name = f"{sub}/{slide_id}.{ext}"
            assert sha256(outdir / name) == sha256(tmp_path / "again" / name), name
    other = make_cohort(tmp_path / "other", **{**COHORT, "n_patients": 2, "seed": 2})
    first = other.slide_id.iloc[0]
    name = f"slides/{first}.svs"
    assert sha256(tmp_path / "other" / name) != sha256(outdir / name)


def test_rerun_is_a_no_op(cohort):
    outdir, sheet = cohort
    files = sorted(p for p in outdir.rglob("*") if p.is_file())
    assert len(files) == 2 * len(sheet) + 1
    before = {p: p.stat().st_mtime_ns for p in files}
    again = make_cohort(outdir, **COHORT)
    pd.testing.assert_frame_equal(again, sheet)
    assert {p: p.stat().st_mtime_ns for p in sorted(p for p in outdir.rglob("*") if p.is_file())} == before


def test_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--patients", "2", "--size", "640", "--seed", "3"]

    def written() -> list[str]:
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]

    assert main(args) == 0
    sheet = pd.read_csv(out / "samples.tsv", sep="\t")
    assert len(written()) == len(sheet) >= 2
    assert main(args) == 0
    assert written() == []
    assert main([*args, "--overwrite"]) == 0
    assert len(written()) == len(sheet)
