"""The reader layer through Snakemake: a sheet of real slides in every format in ../shared (Aperio,
NDPI fluorescence, OME-TIFF H&E and IHC, plain TIFF, a DICOM-WSI folder) runs tile, filter_tissue
and qc_table (QC table + cohort audit): each slide's reader, MPP source and modality are recorded."""

import json

import pandas as pd
import pytest
import yaml
from conftest import SHARED_SLIDES
from test_workflow import snakemake, write_config

SLIDES = {  # slide_id: (path under ../shared, label, sheet mpp, stain)
    "cmu": ("real/aperio/CMU-1-Small-Region.svs", "normal", None, "HE"),
    "tcga": ("real/aperio/tcga-cr-7395-01a-01-ts1.svs", "tumour", 0.25, "HE"),
    "dapi": ("real/hamamatsu/test3-DAPI-2-387.ndpi", "normal", None, "DAPI"),
    "os1": ("real/ome-tiff/OS-1-detail.ome.tif", "tumour", None, "HE"),
    "os2": ("real/ome-tiff/OS-2-ndpi.ome.tif", "tumour", None, "Ki67"),
    "kidney": ("real/tiff/kidney-48-5.tif", "normal", 0.5, ""),
    "dicom": ("fixtures/openslide-python", "normal", None, ""),
}
EXPECT = {  # slide_id: (reader, mpp source prefix, modality)
    "cmu": ("openslide", "openslide.mpp-x", "brightfield"),
    "tcga": ("openslide", "sample sheet", "brightfield"),
    "dapi": ("openslide", "openslide.mpp-x", "fluorescence"),
    "os1": ("tiffslide", "OME PhysicalSizeX", "brightfield"),
    "os2": ("tiffslide", "OME PhysicalSizeX", "brightfield"),
    "kidney": ("tiffslide", "sample sheet", "brightfield"),
    "dicom": ("wsidicom", "DICOM PixelSpacing", "brightfield"),
}


@pytest.mark.slow
def test_every_format_through_the_workflow(tmp_path):
    missing = [rel for rel, *_ in SLIDES.values() if not (SHARED_SLIDES / rel).exists()]
    if missing:
        pytest.skip(f"shared slides absent: {missing}")
    rows = [{"slide_id": s, "patient_id": f"p_{s}", "label": lab, "path": str(SHARED_SLIDES / rel),
             "mpp": mpp if mpp else "", "stain": stain} for s, (rel, lab, mpp, stain) in SLIDES.items()]
    (tmp_path / "cohort").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "cohort" / "samples.tsv", sep="\t", index=False)
    write_config(tmp_path, tiling={"magnifications": [10], "tile_size": 224})
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["on_bad_slide"] = "skip"  # the 16 px DICOM has no full tile at 10x: excluded, the rest go on
    cfg["training"]["magnification"] = 10  # a tiled one (checked while the workflow is parsed)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, "--cores", "2", "results/qc/slides.tsv")
    res = tmp_path / "results"
    table = pd.read_csv(res / "qc" / "slides.tsv", sep="\t").set_index("slide_id")
    audit = pd.read_csv(res / "qc" / "cohort.tsv", sep="\t").set_index("slide_id")
    for sid, (reader, source, modality) in EXPECT.items():
        meta = json.loads((res / "tiles" / sid / "slide.json").read_text())
        assert meta["reader"] == reader and meta["mpp_source"].startswith(source), (sid, meta)
        assert table.loc[sid, "reader"] == reader and audit.loc[sid, "reader"] == reader
        qc = json.loads((res / "qc" / sid / "qc.json").read_text())
        if sid != "dicom":
            assert qc["status"] == ("no tissue" if sid == "kidney" else "ok"), (sid, qc["status"])
            assert qc["modality"] == modality, (sid, qc.get("modality_source"))
    assert json.loads((res / "qc" / "dapi" / "qc.json").read_text())["modality_source"] == "sample sheet stain 'DAPI'"
    assert "Look at these first" in (res / "qc" / "cohort.html").read_text()
