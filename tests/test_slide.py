import pytest

from slidesnake.slide import SlideError, open_slide, resolve_resolution
from conftest import shared_slide


def test_aperio_mpp_and_objective_read_from_slide(cmu_small):
    slide = open_slide(cmu_small, "cmu")
    res = resolve_resolution(slide.properties, "cmu", cmu_small)
    assert res.mpp == pytest.approx(0.499)
    assert res.mpp_source == "openslide.mpp-x"
    assert res.objective_power == 20
    assert res.objective_source == "openslide.objective-power"


def test_ndpi_40x_base():
    path = shared_slide("real/hamamatsu/test3-DAPI-2-387.ndpi")
    res = resolve_resolution(open_slide(path, "ndpi").properties, "ndpi", path)
    assert res.objective_power == 40
    assert res.mpp == pytest.approx(0.22817, rel=1e-3)


def test_slide_without_mpp_fails_clearly_and_override_works():
    path = shared_slide("real/aperio/tcga-cr-7395-01a-01-ts1.svs")
    props = open_slide(path, "tcga").properties
    with pytest.raises(SlideError) as err:
        resolve_resolution(props, "tcga", path)
    msg = str(err.value)
    assert "tcga" in msg and "'mpp' column" in msg and "\n" not in msg
    res = resolve_resolution(props, "tcga", path, mpp_override=0.25)
    assert (res.mpp, res.mpp_source) == (0.25, "sample sheet mpp column")
    assert res.objective_power == pytest.approx(40)
    assert res.objective_source.startswith("derived")


def test_override_beats_metadata_and_defaults_only_when_nothing_known():
    props = {"openslide.mpp-x": "0.5", "openslide.objective-power": "20"}
    assert resolve_resolution(props, "s", mpp_override=0.25).mpp == 0.25
    assert resolve_resolution(props, "s", default_mpp=1.0).mpp == 0.5
    res = resolve_resolution({}, "s", default_mpp=0.5)
    assert (res.mpp, res.objective_power) == (0.5, 20)
    # TIFF resolution tags with their unit; an implausible 72-dpi tag is ignored.
    assert resolve_resolution({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"},
                              "s").mpp == pytest.approx(0.25)
    with pytest.raises(SlideError):
        resolve_resolution({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}, "s")


@pytest.mark.parametrize("name", ["bad/openslide-python/unopenable.tiff"])
def test_unopenable_slide_one_line_error(name):
    path = shared_slide(name)
    with pytest.raises(SlideError) as err:
        open_slide(path, "bad")
    assert "bad" in str(err.value) and "\n" not in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nope.svs", "x")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        open_slide(tmp_path / "empty.svs", "x")
