"""Incremental reruns: after a change, `snakemake -n` plans exactly the jobs that depend on it.

Every scenario starts from its own copy (`cp -a`, mtimes kept) of one small completed run
(tests/smallrun.py) and asserts the dry run's job list: counts per rule and, for the per-slide
stages, which slides.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_workflow import K, job_counts, snakemake

pytestmark = pytest.mark.slow  # left out of make test-fast

PER_SLIDE = ("tile", "filter_tissue", "extract_features")


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def plan(workdir: Path) -> tuple[dict[str, int], dict[str, set[str]]]:
    """Dry run: ({rule: jobs}, {rule: slides}) -- both empty when there is nothing to do."""
    proc = snakemake(workdir, "-n")
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}, {}
    slides = defaultdict(set)
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:[ \t]+.*\n)*)", text, flags=re.M):
        wc = re.search(r"^\s+wildcards: .*\bslide=([^,\s]+)", m.group(2), flags=re.M)
        if wc:
            slides[m.group(1)].add(wc.group(1))
    return job_counts(text), dict(slides)


def edit_config(workdir: Path, section: str, **values) -> None:
    path = workdir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture
def run_copy(small_run, tmp_path) -> tuple[Path, list[str]]:
    work = copy_run(small_run, tmp_path / "run")
    sheet = pd.read_csv(work / "cohort" / "samples.tsv", sep="\t", dtype=str)
    return work, list(sheet["slide_id"])


def cohort_stages(n_heatmaps: int) -> dict[str, int]:
    # every fold trains on every slide's features, so all folds, the summary, every heatmap (the
    # models changed) and the run summary follow any change to the cohort's features
    return {"train": K, "summarize": 1, "heatmap": n_heatmaps, "run_summary": 1, "all": 1}


def test_nothing_changed_nothing_to_do(run_copy):
    work, _ = run_copy
    assert plan(work) == ({}, {})


def test_training_parameter_reruns_training_and_after(run_copy):
    work, slides = run_copy
    edit_config(work, "training", lr=0.001)
    counts, per_slide = plan(work)
    assert counts == cohort_stages(len(slides))
    assert not set(per_slide) & set(PER_SLIDE)


def test_tissue_threshold_reruns_filter_and_after_not_tiling(run_copy):
    work, slides = run_copy
    edit_config(work, "tissue", edge_threshold=20)
    counts, per_slide = plan(work)
    n = len(slides)
    # make_splits follows excluded.tsv (the folds are made from the slides trained on)
    assert counts == {"filter_tissue": n, "extract_features": n, "qc_table": 1, "excluded_table": 1,
                      "make_splits": 1, **cohort_stages(n)}
    assert "tile" not in counts


def test_heatmap_setting_reruns_heatmaps_only(run_copy):
    work, slides = run_copy
    edit_config(work, "heatmap", alpha=0.3)
    counts, _ = plan(work)
    assert counts == {"heatmap": len(slides), "run_summary": 1, "all": 1}


def test_added_slide_runs_its_slide_jobs_and_the_cohort_stages(run_copy):
    work, slides = run_copy
    shutil.copy2(work / "cohort" / "slides" / f"{slides[0]}.svs", work / "cohort" / "slides" / "NEW_S1.svs")
    with open(work / "cohort" / "samples.tsv", "a") as fh:
        fh.write("NEW_S1\tNEWPAT\ttumour\tcohort/slides/NEW_S1.svs\tHE\t\n")
    counts, per_slide = plan(work)
    assert counts == {"tile": 1, "filter_tissue": 1, "extract_features": 1, "make_splits": 1, "qc_table": 1,
                      "excluded_table": 1, **cohort_stages(len(slides) + 1)}
    for rule in PER_SLIDE:
        assert per_slide[rule] == {"NEW_S1"}, rule


def test_replaced_slide_file_reruns_that_slide_and_the_cohort_stages(run_copy):
    work, slides = run_copy
    target = work / "cohort" / "slides" / f"{slides[1]}.svs"
    shutil.copyfile(work / "cohort" / "slides" / f"{slides[0]}.svs", target)  # new content, new mtime
    counts, per_slide = plan(work)
    assert counts == {"tile": 1, "filter_tissue": 1, "extract_features": 1, "qc_table": 1,
                      "excluded_table": 1, "make_splits": 1, **cohort_stages(len(slides))}
    for rule in PER_SLIDE:
        assert per_slide[rule] == {slides[1]}, rule


# Run-shaping settings (docs/design.md, "Result-defining and run-shaping settings"): read by the jobs
# from the config, not rule params, so changing them reruns nothing.
@pytest.mark.parametrize("section, values", [
    ("features", {"batch_size": 7, "num_workers": 1, "compile": True, "device": "auto"}),
    ("tissue", {"thumbnail_size": 512}),
    ("training", {"device": "auto", "tensorboard": True}),
])
def test_run_shaping_setting_reruns_nothing(run_copy, section, values):
    work, _ = run_copy
    edit_config(work, section, **values)
    assert plan(work) == ({}, {})


def test_result_defining_feature_setting_reruns_extraction_and_after(run_copy):
    work, slides = run_copy
    edit_config(work, "features", feature_dtype="float32")
    counts, per_slide = plan(work)
    n = len(slides)
    assert counts == {"extract_features": n, "excluded_table": 1, "make_splits": 1, **cohort_stages(n)}
    assert per_slide["extract_features"] == set(slides)
