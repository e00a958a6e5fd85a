"""The profiles: every rule gets its threads and resources from the workflow profile, and the other
profiles cannot silently replace them (Snakemake merges profiles key by key at the top level: the
workflow profile, loaded last, replaces any list a --profile also sets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_envs import RULE_TABLE

PROFILES = REPO / "workflow" / "profiles"
GPU_RULES = {"extract_features", "train", "tune", "coupling_embedder", "coupling_extract", "coupling_train"}


def load(name: str) -> dict:
    # the slurm profile is a YTE template: its `?if ...` keys are plain strings to YAML
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


WORKFLOW = load("default")
RULES = sorted(r for r in RULE_TABLE if r != "all")


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_has_threads_and_resources(rule):
    assert rule in WORKFLOW["set-threads"], f"{rule}: no threads in workflow/profiles/default"
    res = WORKFLOW["set-resources"].get(rule, {})
    assert {"mem_mb", "runtime"} <= set(res), f"{rule}: mem_mb and runtime expected, got {res}"
    assert (res.get("gpu") == 1) == (rule in GPU_RULES), f"{rule}: gpu {res.get('gpu')}"


def test_no_resources_in_rules():
    # one mechanism: the numbers live in the workflow profile, not in the rules
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for key in ("\n    threads:", "\n    resources:"):
            assert key not in text, f"{smk.name} sets{key.strip()} (use workflow/profiles/default)"


@pytest.mark.parametrize("name", ["slurm", "local-gpu"])
def test_other_profiles_do_not_replace_the_workflow_profile(name):
    overlap = set(load(name)) & set(WORKFLOW)
    assert not overlap, f"profiles/{name} sets {overlap}, which the workflow profile would replace"


def test_slurm_profile_site_settings_come_from_the_environment():
    text = (PROFILES / "slurm" / "config.yaml").read_text()
    prof = load("slurm")
    assert prof["executor"] == "slurm" and prof["retries"] >= 1
    for var in ("SBATCH_PARTITION", "SBATCH_ACCOUNT", "SLIDESNAKE_SLURM_STATUS_COMMAND"):
        assert var in text
    assert load("local-gpu")["resources"] == {"gpu": 1}


def test_slurm_profile_bundles_the_per_slide_stages():
    """Bundles (docs/cluster.md): per-slide rules in groups with a size each, a GPU cap local to each
    bundle, outputs of a failed bundle kept; nothing downstream of the whole cohort grouped (its
    group check would cost the square of the cohort while planning)."""
    prof = load("slurm")
    groups = dict(g.split("=") for g in prof["groups"])
    sizes = {g: int(n) for g, n in (x.split("=") for x in prof["group-components"])}
    assert groups == {"tile": "tiling", "filter_tissue": "tiling", "extract_features": "features"}
    assert set(sizes) == set(groups.values()) and all(n > 1 for n in sizes.values())
    assert prof["resources"] == ["gpu=1"] and prof["set-resource-scopes"] == ["gpu=local"]
    assert prof["keep-incomplete"] is True and prof["slurm-array-jobs"] == "heatmap"
