"""Cohort audit (slidesnake.audit): flags on a constructed cohort, stain vectors and content
hashes on the real slides, and the audit the small end-to-end run wrote."""

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import shared_slide

from slidesnake.audit import audit_html, cohort_audit, content_hash, stain_vectors
from slidesnake.slide import open_slide
from slidesnake.tissue import read_overview

H, E = [0.65, 0.70, 0.29], [0.07, 0.99, 0.11]


def _qc(sid, *, mpp=0.5, kept=100, h=H, e=E, hash_=None, status="ok", source="openslide.mpp-x"):
    return {"slide_id": sid, "status": status, "vendor": "aperio", "reader": "openslide", "mpp": mpp,
            "mpp_source": source, "objective_power": 20, "mask": {"tissue_area_mm2": 10.0},
            "magnifications": {"20": {"target": "20x", "tiles": 200, "tissue": 120, "artefact": 6, "blurred": 12,
                                      "kept": kept}},
            "stain_vectors": {"h": h, "e": e}, "content_hash": hash_ or f"q1:{sid}"}


def test_flags_name_what_breaks_a_study():
    rng = np.random.default_rng(0)
    jitter = lambda v: (np.array(v) + rng.normal(0, 0.01, 3)).tolist()  # noqa: E731
    records = [_qc(f"a{i}", kept=100 + i, h=jitter(H), e=jitter(E)) for i in range(5)]
    records += [_qc(f"b{i}", kept=80 + i, h=jitter(H), e=jitter(E)) for i in range(5)]
    records[1] = _qc("a1", mpp=0.25)                                   # another scanner's pixel size
    records[2] = _qc("a2", kept=5)                                     # tile yield collapsed
    records[3] = _qc("a3", h=[0.30, 0.80, 0.52])                       # another lab's haematoxylin
    records[6] = _qc("b1", hash_="q1:a0")                              # a copy of a0
    records[7] = _qc("b2", source="derived from objective power (10 / objective)")
    records[8] = _qc("b3", status="no tissue")
    sheet = pd.DataFrame({"slide_id": [r["slide_id"] for r in records],
                          "patient_id": [f"p{i}" for i in range(9)] + ["p0"],     # b4 shares a0's patient
                          "label": ["A"] * 5 + ["B"] * 5})
    df = cohort_audit(records, sheet).set_index("slide_id")
    flagged = {sid: set(f.split(",")) - {""} for sid, f in df["flags"].items()}
    assert flagged["a1"] == {"mpp_outlier"}
    assert flagged["a2"] == {"yield_outlier"}
    assert flagged["a3"] == {"stain_outlier"}
    assert flagged["a0"] == {"duplicate", "patient_split"} and flagged["b1"] == {"duplicate"}
    assert flagged["b2"] == {"mpp_guessed"} and flagged["b3"] == {"not_ok"}
    assert flagged["b4"] == {"patient_split"} and flagged["a4"] == set() and flagged["b0"] == set()
    assert df.loc["a0", "blur_fraction"] == pytest.approx(0.1) and df.loc["a0", "pen_fraction"] == pytest.approx(0.05)
    page = audit_html(df.reset_index())
    assert "Look at these first" in page and "mpp_outlier</b> (1)" in page and "a1" in page


def test_stain_vectors_on_real_slides():
    """Macenko (torchstain) on the overviews of H&E and Ki67 IHC: unit optical-density vectors,
    haematoxylin first (it absorbs red more than blue), well apart from the second stain."""
    for rel, mpp in (("real/aperio/CMU-1-Small-Region.svs", 0.499), ("real/ome-tiff/OS-2-ndpi.ome.tif", 0.227)):
        slide = open_slide(shared_slide(rel), "s")
        rgb = read_overview(slide, 4 / mpp).rgb.reshape(-1, 3)
        sv = stain_vectors(rgb)
        h, e = np.array(sv["h"]), np.array(sv["e"])
        assert np.linalg.norm(h) == pytest.approx(1, abs=1e-3) and np.linalg.norm(e) == pytest.approx(1, abs=1e-3)
        assert h[0] > h[2] and np.degrees(np.arccos(np.clip(h @ e, -1, 1))) > 10
    assert stain_vectors(np.full((100, 3), 250, np.uint8)) is None  # blank glass: nothing to fit


def test_content_hash_finds_copies(tmp_path):
    src = shared_slide("real/aperio/CMU-1-Small-Region.svs")
    copy = shutil.copy(src, tmp_path / "renamed.svs")
    assert content_hash(src) == content_hash(copy)
    assert content_hash(src) != content_hash(shared_slide("real/aperio/tcga-cr-7395-01a-01-ts1.svs"))
    folder = shared_slide("fixtures/openslide-python/boxes_0.dcm").parent
    assert content_hash(folder).startswith("q1:")


def test_small_run_wrote_the_audit(small_run):
    qc = small_run / "results" / "qc"
    audit = pd.read_csv(qc / "cohort.tsv", sep="\t")
    slides = pd.read_csv(qc / "slides.tsv", sep="\t")
    assert sorted(audit["slide_id"]) == sorted(slides["slide_id"])
    assert {"reader", "mpp_source", "kept", "blur_fraction", "stain_h", "flags", "label"} <= set(audit.columns)
    assert audit["reader"].eq("openslide").all() and audit["stain_h"].notna().all()
    assert not audit["duplicate"].any() and not audit["patient_split"].any()
    assert "Look at these first" in (qc / "cohort.html").read_text()
