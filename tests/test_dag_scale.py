"""The DAG of a large placeholder cohort (scripts/bench/bench_dag.py times it; this checks it, untimed).

A few hundred slides pointing at placeholder files: the dry run plans exactly the expected jobs,
and the workflow profile's resources reach them (memory of `tile` grows with the slide file,
`gpu` only for the GPU stages).
"""

from __future__ import annotations

import os
import re
import sys

import pytest

from conftest import REPO
from test_workflow import job_counts, snakemake

sys.path.insert(0, str(REPO / "scripts" / "bench"))
from bench_dag import K, make_placeholder_cohort  # noqa: E402

pytestmark = pytest.mark.slow  # left out of make test-fast

N = 300


def job_resources(text: str, rule: str, slide: str | None = None) -> dict[str, str]:
    """The `resources:` line of one job of a dry run (the first of ``rule``, or the one of ``slide``)."""
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:[ \t]+.*\n)*)", text, flags=re.M):
        body = m.group(2)
        if m.group(1) != rule or (slide and not re.search(rf"wildcards: .*\bslide={slide}\b", body)):
            continue
        line = re.search(r"^\s+resources: (.*)$", body, flags=re.M).group(1)
        return dict(kv.split("=", 1) for kv in line.split(", "))
    raise AssertionError(f"no {rule} job for {slide} in the dry run")


def test_dry_run_of_a_few_hundred_slides(tmp_path):
    ids = make_placeholder_cohort(tmp_path, N)
    os.truncate(tmp_path / "slides" / f"{ids[0]}.svs", 4 << 30)  # a sparse 4 GiB "slide"
    proc = snakemake(tmp_path, "-n")
    text = proc.stdout + proc.stderr
    assert job_counts(text) == {"tile": N, "filter_tissue": N, "qc_table": 1, "extract_features": N,
                                "make_splits": 1, "train": K, "summarize": 1, "heatmap": N,
                                "run_summary": 1, "excluded_table": 1, "all": 1}
    # the workflow profile: tile memory 1000 MB + half the slide's size in MB, per attempt
    assert job_resources(text, "tile", ids[0])["mem_mb"] == str(1000 + 4096 // 2)
    assert job_resources(text, "tile", ids[1])["mem_mb"] == "1000"
    for rule in ("extract_features", "train"):
        assert job_resources(text, rule)["gpu"] == "1", rule
    for rule in ("tile", "filter_tissue", "heatmap", "summarize"):
        assert "gpu" not in job_resources(text, rule), rule
