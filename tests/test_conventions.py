"""What users of a Snakemake workflow look for: a licence, the workflow catalog's files, a workflow
formatted with snakefmt and clean under `snakemake --lint` (the catalog and CI of snakemake-workflows
check the same)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import re

import pytest
import yaml

from conftest import REPO
from test_workflow import snakemake

sys.path.insert(0, str(REPO / "scripts" / "bench"))
from bench_dag import make_placeholder_cohort  # noqa: E402


def test_license_is_the_one_pyproject_names():
    licence = re.search(r'^license = \{ text = "(\w+)" \}', (REPO / "pyproject.toml").read_text(), re.M)
    assert licence and licence.group(1) == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def test_workflow_catalog_files():
    cat = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert "--configfile" in cat["usage"]["mandatory-flags"]["flags"]
    assert set(cat["usage"]["software-stack-deployment"]) >= {"conda", "singularity"}
    # config/README.md: the catalog shows it; it names every section of config.yaml
    readme = (REPO / "config" / "README.md").read_text()
    sections = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    missing = [key for key in sections if f"`{key}`" not in readme]
    assert not missing, f"config/README.md does not mention {missing}"


def test_snakefmt_check():
    exe = shutil.which("snakefmt", path=str(REPO / ".venv" / "bin")) or shutil.which("snakefmt")
    if exe is None:
        pytest.skip("snakefmt not installed (pip install -e '.[test]')")
    proc = subprocess.run([exe, "--check", "workflow/"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"run `snakefmt workflow/`:\n{proc.stdout}{proc.stderr}"


def test_snakemake_lint_is_clean(tmp_path):
    make_placeholder_cohort(tmp_path, 12, k=3)  # a sheet the workflow parses; nothing runs
    proc = snakemake(tmp_path, "--lint")
    out = proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in out, out[-4000:]


def test_cohort_wide_inputs_are_functions():
    """A rule's input over every slide is an input function (``cohort_files`` in common.smk), never a
    list: Snakemake looks a list input up once per file it holds, hashing the whole list each time,
    when the rule also names another rule's output. That made planning quadratic in the cohort
    (run_summary alone: 2.9 s at 2,000 slides, 0.3 s as a function; docs/benchmarks.md)."""
    offenders = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.findall(r"^    input:\n((?:        .*\n|\n)+)", smk.read_text(), flags=re.M):
            for line in block.splitlines():
                if re.match(r"\s*\w+=expand\(.*\bslide=(SLIDES|PREDICT_SLIDES)\b", line):
                    offenders.append(f"{smk.name}: {line.strip()}")
    assert not offenders, "cohort-wide list inputs (use cohort_files(...)):\n" + "\n".join(offenders)
