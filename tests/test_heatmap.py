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
