import logging
import pickle

import pytest

from slidesnake.slide import SlideError, check_readable, one_line_errors, open_slide, resolve_resolution
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


def test_mpp_y_tiff_units_and_hamamatsu_vms_properties():
    res = resolve_resolution({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26",
                              "openslide.objective-power": "40"}, "s")
    assert (res.mpp, res.mpp_y) == (0.25, 0.26) and res.anisotropy == pytest.approx(0.04)
    # y from the same source as x; a lone x means square pixels
    assert resolve_resolution({"openslide.mpp-x": "0.25"}, "s").mpp_y == 0.25
    res = resolve_resolution({"tiff.XResolution": "101600", "tiff.YResolution": "50800",
                              "tiff.ResolutionUnit": "inch"}, "s")
    assert (res.mpp, res.mpp_y, res.mpp_source) == (pytest.approx(0.25), pytest.approx(0.5), "tiff resolution tags")
    # Hamamatsu VMS: physical size in nm over the level-0 size in pixels; SourceLens is the objective
    vms = {"hamamatsu.PhysicalWidth": "10000000", "hamamatsu.PhysicalHeight": "5000000",
           "openslide.level[0].width": "40000", "openslide.level[0].height": "20000",
           "hamamatsu.SourceLens": "40"}
    res = resolve_resolution(vms, "s")
    assert (res.mpp, res.mpp_y) == (pytest.approx(0.25), pytest.approx(0.25))
    assert res.mpp_source == "hamamatsu.PhysicalWidth/Height"
    assert (res.objective_power, res.objective_source) == (40, "hamamatsu.SourceLens")
    # aperio.MPP and AppMag when OpenSlide's own properties are missing
    res = resolve_resolution({"aperio.MPP": "0.2520", "aperio.AppMag": "40"}, "s")
    assert (res.mpp, res.mpp_source, res.objective_source) == (0.252, "aperio.MPP", "aperio.AppMag")
    # a config default is used only when the slide says nothing
    res = resolve_resolution({}, "s", default_objective=20)
    assert (res.objective_power, res.objective_source, res.mpp) == (20, "config tiling.default_objective", 0.5)


def test_dicom_opens_by_file_with_its_resolution():
    path = shared_slide("fixtures/openslide-python/boxes_0.dcm")
    slide = open_slide(path, "dcm")
    assert slide.properties["openslide.vendor"] == "dicom"
    check_readable(slide, "dcm", path)
    res = resolve_resolution(slide.properties, "dcm", path)
    assert (res.mpp, res.objective_power) == (pytest.approx(0.499), 20)


def test_unreadable_pixels_fail_with_one_line():
    path = shared_slide("bad/openslide-python/unreadable.svs")
    slide = open_slide(path, "bad2")  # the header opens
    with pytest.raises(SlideError) as err:
        check_readable(slide, "bad2", path)
    msg = str(err.value)
    assert msg.startswith("slide 'bad2'") and "cannot be read" in msg and "\n" not in msg
    # SlideErrors raised in worker processes must survive pickling whole
    again = pickle.loads(pickle.dumps(err.value))
    assert str(again) == msg and again.slide_id == "bad2"


def test_format_openslide_cannot_read_says_so():
    path = shared_slide("real/ome-tiff/OS-1-detail.ome.tif")
    # (auto reads it with tiffslide, tests/test_readers.py); forced onto PIL, PIL opens it ...
    slide = open_slide(path, "ome", reader="image")
    with pytest.raises(SlideError, match="not a whole-slide format OpenSlide reads.*convert it"):
        check_readable(slide, "ome", path)  # ... but cannot decode it


def test_one_line_errors_logs_and_exits(caplog):
    log = logging.getLogger("slidesnake.test")
    with pytest.raises(SystemExit) as exc, caplog.at_level(logging.ERROR):
        with one_line_errors(log):
            raise SlideError("s1", "/x.svs", "broken", "fix it")
    assert exc.value.code == 1
    assert caplog.messages == ["slide 's1' (/x.svs): broken; fix it"]
