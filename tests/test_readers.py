"""The reader layer (slidesnake.readers) on the real slides in ../shared: every format opens, its MPP
comes from the right place, and a slide read by two libraries gives the same grid and tiles."""

import logging
import shutil

import numpy as np
import pytest
from conftest import shared_slide
from PIL import Image

from slidesnake.readers import _ome_properties, reader_of
from slidesnake.slide import SlideError, check_readable, open_slide, resolve_resolution
from slidesnake.tiling import TileReader, tile_slide

DICOM = "fixtures/openslide-python/boxes_0.dcm"


def _tiles(path, grid, tile_size, reader, n=12):
    r = TileReader(path, tile_size, reader=reader)
    idx = np.linspace(0, len(grid) - 1, min(n, len(grid))).astype(int)
    return [r.read(t.dz_tile_size, t.dz_level, t.col, t.row).astype(np.int16) for t in grid.iloc[idx].itertuples()]


@pytest.mark.parametrize("rel, other, mags, tile", [
    ("real/aperio/CMU-1-Small-Region.svs", "tiffslide", [20, 5], 224),
    ("real/hamamatsu/test3-DAPI-2-387.ndpi", "tiffslide", [10, 2.5], 224),
    (DICOM, "wsidicom", [20], 8),
])
def test_same_slide_two_readers_same_grid_and_tiles(rel, other, mags, tile):
    path = shared_slide(rel)
    ga, ma = tile_slide(path, "s", magnifications=mags, tile_size=tile, reader="openslide")
    gb, mb = tile_slide(path, "s", magnifications=mags, tile_size=tile, reader=other)
    assert (ma["reader"], mb["reader"]) == ("openslide", other)
    assert ga.equals(gb)
    assert ma["mpp"] == pytest.approx(mb["mpp"], rel=1e-3)
    assert ma["objective_power"] == pytest.approx(mb["objective_power"])
    for a, b in zip(_tiles(path, ga, tile, "openslide"), _tiles(path, gb, tile, other)):
        assert a.shape == b.shape and a.std() + b.std() > 0
        # near-identical: the NDPI's coarsest levels differ (OpenSlide lists more of them), the rest is exact
        assert np.abs(a - b).mean() < 3


def test_ome_tiff_reads_with_mpp_from_physical_size():
    for rel in ("real/ome-tiff/OS-1-detail.ome.tif", "real/ome-tiff/OS-2-ndpi.ome.tif"):
        path = shared_slide(rel)
        slide = open_slide(path, "ome")
        assert reader_of(slide) == "tiffslide" and slide.properties["openslide.vendor"] == "ome-tiff"
        check_readable(slide, "ome", path)
        res = resolve_resolution(slide.properties, "ome", path)
        assert res.mpp_source == "OME PhysicalSizeX/Y" and res.mpp == pytest.approx(0.2271, abs=1e-4)
        grid, meta = tile_slide(path, "ome", magnifications=["0.5um"], tile_size=224)
        tile = _tiles(path, grid, 224, meta["reader"], n=1)[0]
        assert tile.std() > 10  # H&E / IHC, not a blank decode


def test_ome_units_are_converted():
    xml = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Instrument><Microscope '
           'Manufacturer="Zeiss" Model="Axioscan 7"/><Objective NominalMagnification="20"/></Instrument>'
           '<Image><Pixels PhysicalSizeX="450" PhysicalSizeXUnit="nm" PhysicalSizeY="0.00045" '
           'PhysicalSizeYUnit="mm" SizeC="1"><Channel AcquisitionMode="WideField" IlluminationType="Epifluorescence"/>'
           '</Pixels></Image></OME>')
    p = _ome_properties(xml)
    assert p["ome.mpp-x"] == pytest.approx(0.45) and p["ome.mpp-y"] == pytest.approx(0.45)
    assert p["slidesnake.scanner"] == "Zeiss Axioscan 7" and p["slidesnake.modality"] == "fluorescence"
    res = resolve_resolution(p, "s")
    assert (res.mpp_source, res.objective_power) == ("OME PhysicalSizeX/Y", 20)
    # no unit: OME's default is microns
    assert _ome_properties(xml.replace(' PhysicalSizeXUnit="nm"', '').replace('"450"', '"0.3"'))["ome.mpp-x"] == 0.3


def test_dicom_file_and_folder_through_wsidicom():
    path = shared_slide(DICOM)
    for p in (path, path.parent):  # one instance (its series' siblings come along) or the folder
        slide = open_slide(p, "dcm", reader="wsidicom" if p == path else "auto")
        assert reader_of(slide) == "wsidicom" and slide.dimensions == (16, 16)
        res = resolve_resolution(slide.properties, "dcm", p)
        assert res.mpp == pytest.approx(0.499) and res.mpp_source.startswith("DICOM PixelSpacing")
        assert res.objective_power == 20 and res.objective_source.startswith("DICOM ObjectiveLensPower")
        assert slide.properties["slidesnake.modality"] == "brightfield"
        assert "Leica" in slide.properties["slidesnake.scanner"]


def test_dicom_without_image_type_opens_with_a_warning(tmp_path, caplog):
    pydicom = pytest.importorskip("pydicom")
    src = shared_slide(DICOM).parent
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        ds = pydicom.dcmread(src / name)
        del ds.ImageType
        ds.save_as(tmp_path / name)
    with caplog.at_level(logging.WARNING):
        slide = open_slide(tmp_path / "boxes_0.dcm", "noflavour")
    assert reader_of(slide) == "wsidicom"
    text = " ".join(caplog.messages)
    assert "Couldn't get image flavor" in text and "ImageType" in text and "noflavour" in text
    ref = open_slide(src / "boxes_0.dcm", "ref", reader="wsidicom")
    a, b = (np.asarray(s.read_region((0, 0), 0, (16, 16))) for s in (slide, ref))
    assert np.array_equal(a, b) and a[..., :3].std() > 0


def test_plain_image_needs_a_sheet_mpp(tmp_path):
    src = open_slide(shared_slide("real/aperio/CMU-1-Small-Region.svs"), "cmu")
    png = tmp_path / "crop.png"
    src.read_region((500, 500), 0, (700, 500)).convert("RGB").save(png)
    with pytest.raises(SlideError, match=r"slide 'png'.*'mpp' column"):
        tile_slide(png, "png", magnifications=[20], tile_size=224)
    grid, meta = tile_slide(png, "png", magnifications=[20], tile_size=224, mpp=0.499)
    assert (meta["reader"], meta["mpp_source"], len(grid)) == ("image", "sample sheet mpp column", 6)
    jpg = tmp_path / "crop.jpg"
    Image.open(png).save(jpg, quality=95)
    _, meta = tile_slide(jpg, "jpg", magnifications=[20], tile_size=224, mpp=0.499)
    assert meta["reader"] == "image"


def test_plain_tiff_through_tiffslide():
    path = shared_slide("real/tiff/kidney-48-5.tif")
    grid, meta = tile_slide(path, "kidney", magnifications=[20], tile_size=224, mpp=0.5)
    assert (meta["reader"], meta["vendor"], meta["dimensions"]) == ("tiffslide", "generic-tiff", [1493, 901])
    assert len(grid) == 6 * 4


@pytest.mark.parametrize("case", ["unopenable", "empty_folder", "not_a_slide", "wrong_reader"])
def test_reader_failures_are_one_line(tmp_path, case):
    if case == "unopenable":
        path, reader = shared_slide("bad/openslide-python/unopenable.tiff"), "auto"
    elif case == "empty_folder":
        path, reader = tmp_path, "auto"
        (tmp_path / "notes.txt").write_text("no slide here\n")
    elif case == "not_a_slide":
        path, reader = tmp_path / "x.svs", "auto"
        path.write_text("plain text\n")
    else:
        path, reader = shutil.copy(shared_slide(DICOM), tmp_path / "b.dcm"), "tiffslide"
    with pytest.raises(SlideError) as err:
        check_readable(open_slide(path, "bad", reader=reader), "bad", path)
    msg = str(err.value)
    assert msg.startswith("slide 'bad'") and "\n" not in msg and "; " in msg
