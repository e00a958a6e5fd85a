"""The whole workflow on a real (one-node) SLURM cluster through the shipped profiles.

A module fixture brings the cluster up with ../shared/tools/slurm/up.sh (with accounting, so that
sacct works: the plugin's default status command and this test's evidence) and always tears it
down with down.sh. The test then does what the README's cluster section says -- `make
slurm-profile`, then `snakemake --profile slurm` -- on the small cohort of tests/smallrun.py, under
`timeout -s KILL`, and checks that every job went through sbatch with the workflow profile's
resources, and that every output equals the local run's (contents, not mtimes).

The profile bundles the per-slide stages (job groups, docs/cluster.md): here with bundles of 4
slides for tiling and 3 for features (`--group-components`, as a user would change the profile's
sizes), so the 6 slides make 2 + 2 bundles, and the heatmaps go as one SLURM job array. sacct shows
the bundles: 2 + 2 allocations, each with the largest threads and memory of its jobs (one GPU per
features bundle), and each slide's jobs ran in exactly one bundle.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO
from slidesnake.store import open_store
from test_workflow import K

pytestmark = pytest.mark.slurm

TOOLS = REPO.parent / "shared" / "tools" / "slurm"
STATE = Path(os.environ.get("SLURM_ROOT", "/tmp/slurm-ci"))  # up.sh's state; down.sh removes it
RUN_TIMEOUT_S = 900
GPU_RULES = {"extract_features", "train"}
BUNDLE = {"tiling": 4, "features": 3}  # slides per bundle in this test (--group-components)
GROUP_RULES = {"tiling": {"tile", "filter_tissue"}, "features": {"extract_features"}}


def _bash(script: str, timeout: int, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TOOLS / script)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a SLURM cluster is brought up with apt-get and system daemons: needs root")
    if not (TOOLS / "up.sh").is_file():
        pytest.skip(f"{TOOLS} is absent: no SLURM bring-up script beside the repo")
    if STATE.exists():  # left over by an interrupted run
        _bash("down.sh", 120)
    try:
        up = _bash("up.sh", 600, SLURM_ACCOUNTING="1")
        if up.returncode != 0 or "SLURM up" not in up.stdout:
            pytest.fail(f"up.sh failed ({up.returncode}):\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
        yield
    finally:
        _bash("down.sh", 120)


def sacct(run_uuid: str) -> pd.DataFrame:
    """This run's jobs (job name = the plugin's run id) as sacct reports them."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--name", run_uuid, "-S", "now-1days",
         "-o", "JobID,State,Partition,AllocTRES,ExitCode"],
        capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return pd.DataFrame(rows, columns=["jobid", "state", "partition", "tres", "exit"]).set_index("jobid")


def slurm_jobs(workdir: Path) -> dict[str, str]:
    """{SLURM job id: rule or "group <group>"} from the plugin's logs,
    .snakemake/slurm_logs/rule_<rule>/[<wildcards>/]<id>.log (array tasks: <array id>_<task>.log)
    and .snakemake/slurm_logs/group_<group>_<rules>/<id>.log (bundles)."""
    jobs = {}
    for log in (workdir / ".snakemake" / "slurm_logs").rglob("*.log"):
        top = log.relative_to(workdir / ".snakemake" / "slurm_logs").parts[0]
        if top.startswith("group_"):
            jobs[log.stem] = "group " + top[len("group_"):].split("_", 1)[0]
        else:
            jobs[log.stem] = top[len("rule_"):]
    return jobs


def bundle_slides(workdir: Path, jobid: str) -> dict[str, set[str]]:
    """{rule: slides} that one bundle ran, from its SLURM log (the inner Snakemake's job lines)."""
    log = next((workdir / ".snakemake" / "slurm_logs").rglob(f"{jobid}.log")).read_text()
    ran = {}
    for m in re.finditer(r"^\s*rule (\w+):\n(?:[ \t]+.*\n)*?[ \t]+wildcards: slide=([^\s,]+)", log, flags=re.M):
        ran.setdefault(m.group(1), set()).add(m.group(2))
    return ran


@pytest.fixture(scope="module")
def slurm_run(cluster, small_run, tmp_path_factory):
    from smallrun import make_small_cohort

    work = tmp_path_factory.mktemp("slurm")
    slides = make_small_cohort(work)  # the same cohort and config as small_run, nothing run yet
    xdg = work / "xdg"
    # The README's commands: install the profile once, then run with it.
    subprocess.run(["make", "-s", "-C", str(REPO), "slurm-profile", f"XDG_CONFIG_HOME={xdg}"],
                   check=True, capture_output=True)
    cmd = ["timeout", "-s", "KILL", str(RUN_TIMEOUT_S),
           sys.executable, "-m", "snakemake", "--profile", "slurm",
           "--snakefile", str(REPO / "workflow" / "Snakefile"), "--configfile", "config.yaml",
           # a 2-CPU node; one thread per job as in the local run, so results match bit for bit
           "--max-threads", "1", "--slurm-init-seconds-before-status-checks", "2",
           # bundles of at most 2 CPUs (the node's), and smaller bundles than the profile's
           "--cores", "2", "--group-components", *(f"{g}={n}" for g, n in BUNDLE.items())]
    env = {**os.environ, "XDG_CONFIG_HOME": str(xdg), "SBATCH_PARTITION": "debug"}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, (f"{' '.join(cmd)} -> {proc.returncode}"
                                  f"{' (killed by timeout)' if proc.returncode in (124, 137, -9) else ''}:\n"
                                  f"{text[-8000:]}")
    return work, slides, text


def test_profile_loaded_and_jobs_submitted(slurm_run):
    work, slides, text = slurm_run
    assert "Using profiles slurm and workflow specific profile" in text
    assert re.search(r"submitted with SLURM jobid \d+", text)
    n = len(slides)
    per_rule = Counter(slurm_jobs(work).values())
    # per-slide stages: ceil(n / bundle) sbatch each; heatmaps: n tasks of one array
    assert dict(per_rule) == {"group tiling": -(-n // BUNDLE["tiling"]),
                              "group features": -(-n // BUNDLE["features"]), "make_splits": 1,
                              "train": K, "summarize": 1, "heatmap": n, "run_summary": 1, "qc_table": 1,
                              "excluded_table": 1}
    arrays = {j.split("_")[0] for j, rule in slurm_jobs(work).items() if rule == "heatmap"}
    assert len(arrays) == 1 and all("_" in j for j, r in slurm_jobs(work).items() if r == "heatmap")


def test_each_slide_ran_in_exactly_one_bundle(slurm_run):
    work, slides, _ = slurm_run
    for group, size in BUNDLE.items():
        bundles = [bundle_slides(work, j) for j, r in slurm_jobs(work).items() if r == f"group {group}"]
        for rule in GROUP_RULES[group]:
            ran = [b.get(rule, set()) for b in bundles]
            assert sorted(len(r) for r in ran) == sorted(
                [size] * (len(slides) // size) + ([len(slides) % size] if len(slides) % size else [])), (group, ran)
            assert set().union(*ran) == set(slides) and sum(map(len, ran)) == len(slides), (group, ran)


def test_sacct_shows_every_job_completed_with_the_profile_resources(slurm_run):
    work, _, text = slurm_run
    run_uuid = re.search(r"SLURM run ID: (\S+)", text).group(1)
    acct = sacct(run_uuid)
    jobs = slurm_jobs(work)
    assert set(jobs) <= set(acct.index), f"jobs unknown to sacct: {set(jobs) - set(acct.index)}"
    for jobid, rule in jobs.items():
        row = acct.loc[jobid]
        assert row["state"] == "COMPLETED" and row["exit"] == "0:0", (rule, jobid, dict(row))
        assert row["partition"] == "debug"  # SBATCH_PARTITION, passed on by the profile
        tres = dict(kv.split("=", 1) for kv in row["tres"].split(","))
        if rule == "group tiling":
            # 1-thread tile and filter_tissue jobs, two at a time (--cores 2); memory: two
            # filter_tissue jobs side by side (workflow profile: 4000 MB each)
            assert tres["cpu"] == "2" and tres["mem"] == "8000M" and "gres/gpu" not in tres, row["tres"]
            continue
        if rule == "group features":
            # one GPU per bundle: its extract_features jobs run one after the other (gpu is local)
            assert tres["cpu"] == "1" and tres["mem"] == "16000M" and tres.get("gres/gpu") == "1", row["tres"]
            continue
        assert tres["cpu"] == "1"  # --max-threads 1
        # gpu: 1 for extract_features and train only (workflow profile -> sbatch --gpus)
        assert (tres.get("gres/gpu") == "1") == (rule in GPU_RULES), (rule, row["tres"])


def test_outputs_equal_the_local_run(slurm_run, small_run):
    work, slides, _ = slurm_run
    local, remote = small_run / "results", work / "results"
    assert (remote / "splits" / "splits.csv").read_bytes() == (local / "splits" / "splits.csv").read_bytes()
    for sid in slides:
        for table in (f"tiles/{sid}/grid.parquet", f"tissue/{sid}/tiles.parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(remote / table), pd.read_parquet(local / table))
        a = open_store(remote / "features" / "resnet18_trunc" / f"{sid}.zarr")
        b = open_store(local / "features" / "resnet18_trunc" / f"{sid}.zarr")
        assert a.features(20).shape[0] > 0
        assert np.array_equal(a.features(20), b.features(20)), sid
        assert np.array_equal(a.coords(20), b.coords(20)), sid
        ha = np.asarray(Image.open(remote / "heatmaps" / "abmil" / f"{sid}.png"))
        hb = np.asarray(Image.open(local / "heatmaps" / "abmil" / f"{sid}.png"))
        assert np.array_equal(ha, hb), sid
    for fold in range(K):
        rel = f"models/abmil/fold_{fold}/predictions.csv"
        pd.testing.assert_frame_equal(pd.read_csv(remote / rel), pd.read_csv(local / rel))
    for rel in ("summary/abmil/summary.csv", "summary/abmil/predictions.csv", "run_summary/slides.tsv"):
        sep = "\t" if rel.endswith(".tsv") else ","
        pd.testing.assert_frame_equal(pd.read_csv(remote / rel, sep=sep), pd.read_csv(local / rel, sep=sep))
