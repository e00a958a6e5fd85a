import pytest
import numpy as np
import pandas as pd
from PIL import Image

from slidesnake.heatmap import normalise, oof_fold, render, score_map


def test_score_map_places_tiles_by_level0_box():
    # 1000 x 500 slide drawn at 100 x 50: a hot tile at level-0 (600, 200, 100 x 100).
    coords = np.array([[0, 0], [600, 200]])
    size = np.array([[100, 100], [100, 100]])
    m = score_map(coords, size, np.array([0.1, 1.0]), (1000, 500), (100, 50))
    assert m.shape == (50, 100)
    assert np.nanargmax(m) == np.ravel_multi_index((20, 60), m.shape)
    assert (m[20:30, 60:70] == 1.0).all() and (m[0:10, 0:10] == 0.1).all()
    assert np.isnan(m[40, 90])


def test_overlapping_tiles_are_averaged():
    m = score_map(np.array([[0, 0], [50, 0]]), np.array([[100, 100]] * 2), np.array([0.0, 1.0]),
                  (200, 100), (200, 100))
    assert m[0, 75] == 0.5 and m[0, 25] == 0.0 and m[0, 125] == 1.0


def test_normalise_clips_percentiles():
    x = np.r_[np.zeros(98), 0.5, 100.0]
    n = normalise(x, 1, 99)
    assert n.min() == 0 and n.max() == 1 and n[-2] > 0
    assert (normalise(np.ones(5)) == 0.5).all()


def test_oof_fold_and_render(tmp_path):
    splits = pd.DataFrame({"fold": [0, 0, 1, 1], "slide_id": ["a", "b", "a", "b"],
                           "split": ["test", "train", "train", "test"]})
    assert oof_fold(splits, "a") == 0 and oof_fold(splits, "b") == 1 and oof_fold(splits, "c") is None
    fig = render(Image.new("RGB", (100, 50), "white"), np.full((50, 100), 0.5), title="t")
    fig.savefig(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


# ------------------------------------------------------------------ exact alignment on a synthetic slide

BOX = (1500, 480, 2650, 1100)  # level-0 x0, y0, x1, y1 of the planted texture (off-centre; holds
# whole tiles at 20x and 10x but is aligned to neither grid)
BLUE = np.array([20, 40, 230], np.uint8)


def _render_box(x, y, w, h, ds):
    """Pale pink glass with a blue checker texture only inside BOX (pixel centres in level-0 px)."""
    xs = x + (np.arange(w) + 0.5) * ds
    ys = y + (np.arange(h) + 0.5) * ds
    inside = ((ys[:, None] >= BOX[1]) & (ys[:, None] < BOX[3]) & (xs[None, :] >= BOX[0]) & (xs[None, :] < BOX[2]))
    checker = ((xs[None, :] // 8 + ys[:, None] // 8) % 2).astype(bool)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (235, 215, 225)
    img[inside] = BLUE
    img[inside & checker] = BLUE // 2
    return img


@pytest.fixture(scope="module")
def box_slide(tmp_path_factory):
    from slidesnake.demo import write_slide

    path = tmp_path_factory.mktemp("align") / "box.svs"
    # 2900 x 1900: not square, not a multiple of the 256 tile (partial tiles are dropped)
    write_slide(path, 2900, 1900, _render_box, mpp=0.5, objective=20)
    return path


@pytest.mark.parametrize("mag", [20, 10])
def test_heatmap_hot_spot_sits_on_the_planted_box(box_slide, mag):
    import openslide

    from slidesnake.slide import Resolution
    from slidesnake.tiling import TileReader, build_grid

    slide = openslide.open_slide(str(box_slide))
    res = Resolution(mpp=0.5, mpp_source="test", objective_power=20, objective_source="test")
    grid, info = build_grid(slide, res, [mag], 256)
    assert info[f"{mag:g}"]["n_partial_dropped"] > 0
    reader = TileReader(box_slide, 256)
    # Score = fraction of blue pixels in the tile as read from the slide (a "feature" of its pixels).
    scores = np.array([(np.asarray(reader.read(r.dz_tile_size, r.dz_level, r.col, r.row))[..., 0] < 120).mean()
                       for r in grid.itertuples()])
    # ... which matches the tile's level-0 box overlap with BOX: grid coordinates address the right pixels
    ox = np.clip(np.minimum(grid.x + grid.w, BOX[2]) - np.maximum(grid.x, BOX[0]), 0, None)
    oy = np.clip(np.minimum(grid.y + grid.h, BOX[3]) - np.maximum(grid.y, BOX[1]), 0, None)
    overlap = (ox * oy / (grid.w * grid.h)).to_numpy()
    assert np.abs(scores - overlap).max() < 0.05
    thumb = slide.get_thumbnail((512, 512)).convert("RGB")
    amap = score_map(grid[["x", "y"]].to_numpy(), grid[["w", "h"]].to_numpy(), normalise(scores, 0, 100),
                     slide.dimensions, thumb.size)
    assert amap.shape == (thumb.size[1], thumb.size[0])
    sx, sy = thumb.size[0] / slide.dimensions[0], thumb.size[1] / slide.dimensions[1]
    hot_y, hot_x = np.nonzero(amap >= np.nanmax(amap) - 1e-9)
    assert len(hot_x) > 0
    assert hot_x.min() >= np.floor(BOX[0] * sx) - 1 and hot_x.max() <= np.ceil(BOX[2] * sx) + 1
    assert hot_y.min() >= np.floor(BOX[1] * sy) - 1 and hot_y.max() <= np.ceil(BOX[3] * sy) + 1
    # the thumbnail under the hot spot is the planted texture
    blue = np.asarray(thumb)[hot_y, hot_x, 0] < 120
    assert blue.mean() > 0.9
    # the overlay is drawn on the thumbnail's pixel grid (same extent)
    fig = render(thumb, amap)
    ims = fig.axes[1].get_images()
    assert ims[0].get_extent() == ims[1].get_extent()


def test_localisation_auc_against_region_polygon():
    from slidesnake.heatmap import localisation_auc, localisation_table

    # 4 x 3 grid of 100 px tiles; region = square over the tiles at columns 1-2, row 1 (hole-free)
    xs, ys = np.meshgrid(np.arange(4) * 100, np.arange(3) * 100)
    tiles = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "w": 100, "h": 100, "magnification": 20.0})
    region = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[100, 100], [300, 100], [300, 200], [100, 200], [100, 100]]]}}]}
    inside = ((tiles.x >= 100) & (tiles.x < 300) & (tiles.y == 100)).to_numpy()
    tiles["attention"] = np.where(inside, 0.9, 0.1)
    assert localisation_auc(tiles, region) == 1.0
    tiles["attention"] = np.where(inside, 0.1, 0.9)
    assert localisation_auc(tiles, region) == 0.0
    empty = {"type": "FeatureCollection", "features": []}
    assert np.isnan(localisation_auc(tiles, empty))
    table = localisation_table([("a", "tumour", tiles, region), ("b", "normal", tiles, empty),
                                ("c", "tumour", tiles, None)])
    assert list(table["slide_id"]) == ["a", "b", "c", "mean"]
    assert table["auc"].iloc[-1] == 0.0 and table["n_inside"].iloc[0] == 2


def test_tiles_geojson_is_qupath_detections_and_smooth_keeps_nan():
    import json

    from slidesnake.heatmap import smooth, tiles_geojson

    tiles = pd.DataFrame({"slide_id": "s", "tile_id": [3, 7], "magnification": 20.0, "x": [0, 512],
                          "y": [256, 0], "w": 512, "h": 512, "attention": [0.2, 0.8], "attention_norm": [0.0, 1.0]})
    gj = json.loads(json.dumps(tiles_geojson(tiles)))
    f = gj["features"][1]
    assert f["properties"]["objectType"] == "detection"
    assert f["properties"]["measurements"] == {"attention": 0.8, "attention_norm": 1.0}
    assert f["geometry"]["coordinates"][0][0] == [512, 0] and f["geometry"]["coordinates"][0][2] == [1024, 512]
    m = np.full((20, 30), np.nan)
    m[5:15, 5:25] = 0.0
    m[5:15, 15:25] = 1.0
    s = smooth(m, 2)
    assert np.isnan(s[0, 0]) and 0 < s[10, 15] < 1 and np.isfinite(s[5:15, 5:25]).all()
    assert smooth(m, 0) is m


def test_instance_scores_only_for_models_with_instance_classifiers():
    import torch

    from slidesnake.heatmap import instance_scores
    from slidesnake.models import create_model

    torch.manual_seed(0)
    bag = torch.randn(7, 16)
    clam, abmil = create_model("clam", 16, 2).eval(), create_model("abmil", 16, 2).eval()
    with torch.no_grad():
        s = instance_scores(clam, clam(bag))
        assert s.shape == (7,) and ((s >= 0) & (s <= 1)).all()
        assert instance_scores(abmil, abmil(bag)) is None


def test_heatmap_slide_opens_in_openslide_on_slide_coordinates(tmp_path):
    import openslide

    from slidesnake.heatmap import write_heatmap_slide

    tiles = pd.DataFrame({"magnification": 20.0, "x": [0, 512, 1024], "y": [256, 256, 768], "w": 512, "h": 512,
                          "attention_norm": [0.0, 1.0, 0.5]})
    write_heatmap_slide(tmp_path / "h.svs", tiles, (1700, 1300), cmap="gray")
    s = openslide.open_slide(str(tmp_path / "h.svs"))
    assert s.dimensions == (1700, 1300) and s.level_count >= 2
    px = lambda x, y: np.asarray(s.read_region((x, y), 0, (1, 1)).convert("RGB"))[0, 0].astype(int)  # noqa: E731
    assert (px(256, 512) < 30).all() and (px(768, 512) > 225).all()  # score 0 -> black, 1 -> white (gray)
    assert abs(px(1280, 1024)[0] - 128) < 20 and (px(100, 100) > 225).all()  # 0.5 -> grey; off tiles: white


def test_uniform_scale_is_comparable_across_slides():
    """heatmap.scale: uniform -- the colour says the tile's weight relative to 1/N, the same on every
    slide: flat attention is mid-scale (not stretched to the full range as per-slide percentiles do)."""
    from slidesnake.heatmap import relative_to_uniform, scale_attention

    flat = np.full(50, 1 / 50)
    np.testing.assert_allclose(relative_to_uniform(flat), 0.5)
    assert np.ptp(scale_attention(flat + np.linspace(0, 1e-6, 50), "slide")) == pytest.approx(1.0)
    np.testing.assert_allclose(scale_attention(flat, "uniform"), 0.5)
    # a tile with 4x (or more) the uniform weight is 1, 1/4x (or less) is 0, 2x is 0.75 on a log scale
    w = np.array([4.0, 0.25, 1.0, 1.0, 0.75, 0.5, 0.25, 0.25])  # relative to uniform: sums to N = 8
    np.testing.assert_allclose(relative_to_uniform(w, 4)[:4], [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(relative_to_uniform(w * 3.7 / 1000, 4), relative_to_uniform(w, 4))  # any sum
    np.testing.assert_allclose(relative_to_uniform(np.array([2.0, 0.5, 1.0, 0.5]), 4), [0.75, 0.25, 0.5, 0.25])
    assert relative_to_uniform(np.array([1.0, 1.0, 2.0]), 2)[2] == pytest.approx((np.log(1.5) / np.log(2) + 1) / 2)
    # same relative weights, different bag sizes and sums -> same colours
    np.testing.assert_allclose(relative_to_uniform(np.array([1, 1, 3, 3.0])),
                               relative_to_uniform(np.array([1, 3.0]) * 7)[[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="heatmap.scale"):
        scale_attention(flat, "cohort")


def _heatmap_settings(**overrides):
    """The settings of config/config.yaml's heatmap section, as rule heatmap passes them."""
    import yaml

    from conftest import REPO
    from slidesnake.heatmap_stage import HeatmapSettings

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    h, t = cfg["heatmap"], cfg["training"]
    kw = dict(magnification=t["magnification"], magnifications=t.get("magnifications"),
              thumbnail_size=h["thumbnail_size"], alpha=h["alpha"], cmap=h["cmap"],
              percentiles=(h["low_percentile"], h["high_percentile"]), scale=h["scale"],
              uniform_range=h["uniform_range"], smooth_sigma=h["smooth_sigma"], top_k=h["top_k"],
              patch_predictions=h["patch_predictions"])
    return HeatmapSettings(**{**kw, **overrides})


@pytest.mark.parametrize("scale", ["slide", "uniform"])
def test_heatmap_job_is_the_rule_and_titles_its_scale(small_run, tmp_path, monkeypatch, scale):
    """slidesnake.heatmap_stage.heatmap_job called from Python on the shared small run: with the run's
    settings it writes the rule's tile table; the single attention panel names the scale in use
    (under scale: uniform it was titled "percentile-normalised" too)."""
    import slidesnake.io
    from slidesnake.heatmap_stage import HeatmapOutputs, heatmap_job

    res = small_run / "results"
    sheet = pd.read_csv(small_run / "cohort" / "samples.tsv", sep="\t", dtype=str)
    sid, path = sheet["slide_id"].iloc[0], small_run / sheet["path"].iloc[0]
    figures = {}
    save = slidesnake.io.save_figure
    monkeypatch.setattr(slidesnake.io, "save_figure",
                        lambda fig, p, **kw: (figures.__setitem__(p, fig), save(fig, p, **kw)))
    out = HeatmapOutputs(*(tmp_path / f"{sid}{s}" for s in (".png", ".tiles.csv", ".geojson", ".top_tiles.png")))
    heatmap_job(slide=path, store=res / "features" / "resnet18_trunc" / f"{sid}.zarr",
                models=sorted(str(p) for p in (res / "models" / "abmil").glob("fold_*/model.pt")),
                slide_id=sid, splits=res / "splits" / "splits.csv", samples=small_run / "cohort" / "samples.tsv",
                settings=_heatmap_settings(scale=scale), outputs=out)
    got = pd.read_csv(out.tiles)
    rule = pd.read_csv(res / "heatmaps" / "abmil" / f"{sid}.tiles.csv")
    pd.testing.assert_frame_equal(got.drop(columns="attention_norm"), rule.drop(columns="attention_norm"))
    if scale == "slide":
        pd.testing.assert_frame_equal(got, rule)
    panel = figures[out.png].axes[1].get_title()
    assert panel == ("attention (percentile-normalised)" if scale == "slide"
                     else "attention (relative to uniform, log scale, 1/4x to 4x)")
