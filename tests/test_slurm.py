"""The whole workflow on a real (one-node) SLURM cluster through the shipped profiles.

A module fixture brings the cluster up with ../shared/tools/slurm/up.sh (with accounting, so that
sacct works: the plugin's default status command and this test's evidence) and always tears it
down with down.sh. The test then does what the README's cluster section says -- `make
slurm-profile`, then `snakemake --profile slurm` -- on the small cohort of tests/smallrun.py, under
`timeout -s KILL`, and checks that every job went through sbatch with the workflow profile's
resources, and that every output equals the local run's (contents, not mtimes).
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
    """{SLURM job id: rule} from the plugin's logs, .snakemake/slurm_logs/rule_<rule>/[<wildcards>/]<id>.log"""
    jobs = {}
    for log in (workdir / ".snakemake" / "slurm_logs").rglob("*.log"):
        rule = next(p for p in log.relative_to(workdir / ".snakemake" / "slurm_logs").parts
                    if p.startswith("rule_"))[len("rule_"):]
        jobs[log.stem] = rule
    return jobs


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
           "--max-threads", "1", "--slurm-init-seconds-before-status-checks", "2"]
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
    assert dict(per_rule) == {"tile": n, "filter_tissue": n, "extract_features": n, "make_splits": 1,
                              "train": K, "summarize": 1, "heatmap": n, "run_summary": 1, "qc_table": 1,
                              "excluded_table": 1}


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
        assert tres["cpu"] == "1"  # --max-threads 1
        # gpu: 1 for extract_features and train only (workflow profile -> sbatch --gpus)
        assert (tres.get("gres/gpu") == "1") == (rule in GPU_RULES), (rule, row["tres"])
        if rule == "extract_features":
            assert tres["mem"] == "16000M"


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
