"""Tissue masks per stain on the real slides in ../shared: brightfield H&E, IHC (DAB + haematoxylin)
and fluorescence (dark background: the mask inverts), checked against hand-drawn expectations
(tests/data/tissue_expectations.yaml)."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import shared_slide

from slidesnake.slide import open_slide, resolve_resolution
from slidesnake.tissue import (ArtefactParams, OtsuParams, TissueParams, artefact_fractions, read_overview, resolve_modality,
                               stain_modality, tissue_mask)

EXPECT = yaml.safe_load((Path(__file__).parent / "data" / "tissue_expectations.yaml").read_text())


def _mask(name, params=OtsuParams()):
    e = EXPECT[name]
    path = shared_slide(e["path"])
    slide = open_slide(path, name)
    res = resolve_resolution(slide.properties, name, path, mpp_override=e.get("mpp"))
    overview = read_overview(slide, params.mask_mpp / res.mpp)
    modality, source = resolve_modality("auto", None, None, overview.rgb)
    return tissue_mask(overview, res.mpp, params, modality).mask, modality, source


def _share(mask, box):
    h, w = mask.shape
    x0, y0, x1, y1 = box
    part = mask[int(y0 * h):max(int(y0 * h) + 1, int(y1 * h)), int(x0 * w):max(int(x0 * w) + 1, int(x1 * w))]
    return float(part.mean())


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_mask_matches_hand_drawn_expectations(name):
    e = EXPECT[name]
    mask, modality, source = _mask(name)
    assert modality == e["modality"] and source.startswith("image")  # told by the image alone
    lo, hi = e["coverage"]
    assert lo <= mask.mean() <= hi, f"{name}: coverage {mask.mean():.3f} not in [{lo}, {hi}]"
    for box in e.get("tissue", []):
        assert _share(mask, box) >= 0.85, f"{name}: tissue box {box} only {_share(mask, box):.2f} mask"
    for box in e.get("background", []):
        assert _share(mask, box) <= 0.1, f"{name}: background box {box} is {_share(mask, box):.2f} mask"


def test_fluorescence_needs_the_inverted_mask():
    """Read as brightfield, the dark DAPI background is all 'tissue' (the failure this fixes)."""
    e = EXPECT["dapi"]
    path = shared_slide(e["path"])
    slide = open_slide(path, "dapi")
    res = resolve_resolution(slide.properties, "dapi", path)
    overview = read_overview(slide, 8 / res.mpp)
    wrong = tissue_mask(overview, res.mpp, OtsuParams(), "brightfield").mask
    right = tissue_mask(overview, res.mpp, OtsuParams(), "fluorescence").mask
    assert wrong.mean() > 0.95 and _share(wrong, e["background"][0]) > 0.9
    assert _share(right, e["background"][0]) <= 0.1


def test_small_ihc_fragment_found_with_a_smaller_minimum_area():
    """The kidney IHC fragment (pale haematoxylin, near-zero saturation) is found by optical density."""
    mask, _, _ = _mask("kidney", OtsuParams(min_area_mm2=0.0005))
    box = [0.17, 0.53, 0.28, 0.66]  # the fragment, drawn on the thumbnail
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    assert len(ys) >= 4 and mask.mean() <= 0.01
    assert (xs >= box[0] * w).all() and (xs <= box[2] * w).all() and (ys >= box[1] * h).all() and (ys <= box[3] * h).all()
    no_od, _, _ = _mask("kidney", OtsuParams(min_area_mm2=0.0005, od_threshold=0))
    assert no_od.sum() < mask.sum()  # saturation alone misses most of it


def test_modality_sources():
    dark = np.zeros((20, 20, 3), np.uint8)
    bright = np.full((20, 20, 3), 240, np.uint8)
    assert resolve_modality("auto", None, None, dark) == ("fluorescence", "image (background brightness)")
    assert resolve_modality("auto", None, None, bright)[0] == "brightfield"
    assert resolve_modality("auto", "DAPI", None, bright) == ("fluorescence", "sample sheet stain 'DAPI'")
    assert resolve_modality("auto", "Ki67", "fluorescence", dark)[0] == "brightfield"  # the sheet wins
    assert resolve_modality("auto", None, "fluorescence", bright) == ("fluorescence", "slide metadata")
    assert resolve_modality("brightfield", "DAPI", None, dark)[0] == "brightfield"  # config forces
    assert [stain_modality(s) for s in ("HE", "mIF panel 1", "CD3-FITC", "", None, "IHC DAB")] == [
        "brightfield", "fluorescence", "fluorescence", None, None, "brightfield"]
    with pytest.raises(ValueError, match="tissue.modality"):
        TissueParams(modality="darkfield")


def test_pen_still_vetoed_on_ihc():
    """Green / blue / black pen over the Ki67 IHC crop is ink; the IHC itself (brown DAB) is not."""
    path = shared_slide(EXPECT["os2"]["path"])
    rgb = np.asarray(open_slide(path, "os2").read_region((0, 0), 0, (448, 448)).convert("RGB")).copy()
    assert artefact_fractions(rgb)[1] < 0.1
    for colour in ((20, 140, 60), (30, 40, 200), (35, 35, 40)):
        inked = rgb.copy()
        alpha = 0.95 if max(colour) < 50 else 0.7  # black ink is near-opaque, coloured ink translucent
        inked[100:300] = ((1 - alpha) * inked[100:300] + alpha * np.array(colour)).astype(np.uint8)
        assert artefact_fractions(inked)[1] > ArtefactParams().max_ink, colour  # vetoed
