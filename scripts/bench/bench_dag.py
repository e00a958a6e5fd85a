"""How long Snakemake takes to build slidesnake's DAG (`snakemake -n`) for large cohorts.

For each cohort size, writes a sample sheet of N slides pointing at small placeholder files (the
dry run never opens a slide: it only needs the files to exist), then times `snakemake -n` in a
fresh process (interpreter start, workflow parsing, sheet validation, DAG building and printing
the plan: everything a user waits for). Results go to stdout as a Markdown table.

    .venv/bin/python scripts/bench/bench_dag.py          # 500, 1000, 5000 slides (make bench-dag)
    .venv/bin/python scripts/bench/bench_dag.py --sizes 5000 --profile dag.prof   # + cProfile
    .venv/bin/python -m pstats dag.prof                  # then: sort cumtime / stats 30
    .venv/bin/python scripts/bench/bench_dag.py --slurm  # with --profile slurm (bundles on) and the
                                                         # number of sbatch submissions it plans
    .venv/bin/python scripts/bench/bench_dag.py --slurm --first-sbatch   # + seconds until a real
                                                         # `snakemake --profile slurm` run submits

With ``--slurm`` the dry run uses workflow/profiles/slurm (linked into a temporary
$XDG_CONFIG_HOME, as `make slurm-profile` does), so the job groups (bundles) are formed while the
DAG is built, and a second, untimed dry run counts what the SLURM executor would submit: every
group job (bundle) and every ungrouped job is one sbatch, and the rules the profile sends as job
arrays (`slurm-array-jobs`) one sbatch per up to `slurm-array-limit` (1,000) of their jobs.

With ``--first-sbatch`` (needs ``--slurm``) it also starts a real run, `snakemake --profile slurm`
with the SLURM executor plugin, and times how long the cluster waits before the first job is
submitted: the plan a cluster user waits for (the DAG is built and checked; jobs are then printed
and their resources evaluated as they are submitted, not all up front as a dry run does). The
scheduler's commands (sbatch, squeue, sacct, scontrol, sacctmgr, sinfo) are stand-ins on PATH: sbatch
notes the time of its first call and answers a job id; nothing is run. The run is then stopped.

tests/test_dag_scale.py plans a few hundred placeholder slides with the same helper (untimed).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"
K = 5


def make_placeholder_cohort(workdir: Path, n_slides: int, slides_per_patient: int = 2,
                            k: int = K) -> list[str]:
    """Sample sheet of ``n_slides`` placeholder slides (1 KiB files) and a config; the slide ids."""
    slides = workdir / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    ids = [f"S{i:06d}" for i in range(n_slides)]
    for sid in ids:
        (slides / f"{sid}.svs").write_bytes(b"\0" * 1024)
    n_patients = -(-n_slides // slides_per_patient)
    patients = [f"P{i // slides_per_patient:06d}" for i in range(n_slides)]
    labels = ["tumour" if int(p[1:]) % 2 else "normal" for p in patients]
    assert n_patients >= 2 * k, "too few patients for the folds"
    pd.DataFrame({"slide_id": ids, "patient_id": patients, "label": labels,
                  "path": [f"slides/{sid}.svs" for sid in ids]}).to_csv(
        workdir / "samples.tsv", sep="\t", index=False)
    (workdir / "config.yaml").write_text(yaml.safe_dump(
        {"samples": "samples.tsv", "classes": ["normal", "tumour"], "splits": {"k": k}}))
    return ids


def slurm_env(root: Path) -> dict:
    """Environment whose $XDG_CONFIG_HOME/snakemake/slurm is this repository's cluster profile."""
    link = root / "xdg" / "snakemake" / "slurm"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(REPO / "workflow" / "profiles" / "slurm")
    return {**os.environ, "XDG_CONFIG_HOME": str(root / "xdg")}


# Runs `snakemake -n` in-process with the dry-run executor's run_job wrapped, so that every unit the
# scheduler hands to the executor -- a group job (bundle) or a single job -- is counted by rule.
_COUNTER = """
import collections, json, sys
from snakemake.executors import dryrun
units = collections.Counter()
_run_job = dryrun.Executor.run_job
def run_job(self, job):
    units["group " + str(job.name) if job.is_group() else job.rule.name] += 1
    sizes.setdefault(str(job.name), []).append(len(job.jobs)) if job.is_group() else None
    return _run_job(self, job)
sizes = {}
dryrun.Executor.run_job = run_job
from snakemake.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
print("UNITS " + json.dumps({"units": units, "group_sizes": sizes}))
"""


def count_submissions(workdir: Path, env: dict, snakefile: Path = SNAKEFILE) -> dict:
    """sbatch submissions the SLURM profile plans for ``workdir``'s cohort: {what: count}.

    Groups: one per bundle. Rules named in the profile's ``slurm-array-jobs``: one per
    ``slurm-array-limit`` jobs. Every other job: one each.
    """
    import json

    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    arrays = {r.strip() for r in str(profile.get("slurm-array-jobs") or "").split(",") if r.strip()}
    limit = int(profile.get("slurm-array-limit", 1000))
    cmd = [sys.executable, "-c", _COUNTER, "--profile", "slurm", "--snakefile", str(snakefile),
           "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("UNITS ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"counting failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(line[len("UNITS "):])
    out = {}
    for what, n in data["units"].items():
        if what == "all":  # the target rule runs nothing (localrule)
            continue
        out[what] = -(-n // limit) if what in arrays else n
    out["group sizes"] = {g: (min(v), max(v)) for g, v in data["group_sizes"].items()}
    return out


def dry_run(workdir: Path, *extra: str, profile: Path | None = None,
            snakefile: Path = SNAKEFILE, env: dict | None = None) -> tuple[float, float, str]:
    """Wall and CPU seconds of `snakemake -n` in ``workdir``, and its output.

    On a busy machine wall time mostly measures the other processes; the CPU time (user + system of
    the Snakemake process) is what the dry run costs, and its wall time on an idle machine.
    """
    prefix = [sys.executable]
    if profile is not None:
        prefix += ["-m", "cProfile", "-o", str(profile)]
    cmd = [*prefix, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "-n", *extra]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, cpu, proc.stdout + proc.stderr


# Stand-ins for the scheduler's commands (--first-sbatch): every call is logged; sbatch writes the
# time of the first submission and answers a job id; sacctmgr / sshare know the account it is given.
_FAKE = {
    "sbatch": 'cat > /dev/null\n[ -f "$STAMP" ] || date +%s.%N > "$STAMP"\necho 4242\n',
    "sacctmgr": "echo bench\n",
    "sshare": "echo bench\n",
}


def first_submission(workdir: Path, env: dict, snakefile: Path = SNAKEFILE, timeout: float = 900.0) -> float:
    """Seconds from starting `snakemake --profile slurm` in ``workdir`` to its first sbatch call."""
    import signal

    fake = workdir / "fake-slurm"
    (fake / "bin").mkdir(parents=True, exist_ok=True)
    stamp = fake / "first-sbatch"
    stamp.unlink(missing_ok=True)
    for cmd in ("sbatch", "squeue", "sacct", "scontrol", "sacctmgr", "sshare", "sinfo", "scancel"):
        path = fake / "bin" / cmd
        path.write_text(f'#!/bin/sh\necho "{cmd} $*" >> "{fake}/calls.log"\n' + _FAKE.get(cmd, "exit 0\n"))
        path.chmod(0o755)
    run_env = {**env, "PATH": f"{fake / 'bin'}:{env.get('PATH', '')}", "STAMP": str(stamp),
               "SBATCH_PARTITION": "bench", "SBATCH_ACCOUNT": "bench"}
    cmd = [sys.executable, "-m", "snakemake", "--profile", "slurm", "--snakefile", str(snakefile),
           "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--nolock"]
    log = fake / "snakemake.log"  # a file, not a pipe: a full pipe would stop the run
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=run_env, start_new_session=True)
    try:
        while not stamp.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended before submitting anything:\n{log.read_text()[-3000:]}")
            if time.time() - t0 > timeout:
                raise RuntimeError(f"no sbatch within {timeout:.0f} s")
            time.sleep(0.2)
        return float(stamp.read_text()) - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def job_total(text: str) -> int:
    for line in text.split("Job stats:", 1)[1].splitlines():
        if line.startswith("total"):
            return int(line.split()[1])
    raise ValueError("no job stats in the dry run's output")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 5000])
    ap.add_argument("--repeat", type=int, default=1, help="dry runs per size (the minimum is reported)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the cohorts here (default: a temp dir)")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile output of the largest size's run")
    ap.add_argument("--snakefile", type=Path, default=SNAKEFILE,
                    help="another copy of the workflow, to compare (default: this repository's)")
    ap.add_argument("--slurm", action="store_true",
                    help="plan with --profile slurm (bundles on) and count the sbatch submissions")
    ap.add_argument("--first-sbatch", action="store_true",
                    help="with --slurm: also time a real run until its first sbatch (stand-in scheduler)")
    args = ap.parse_args(argv)
    if args.first_sbatch and not args.slurm:
        ap.error("--first-sbatch needs --slurm")

    import snakemake

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(tmp.name) if tmp else args.workdir
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"Python {platform.python_version()}; Snakemake {snakemake.__version__}")
    env = slurm_env(root) if args.slurm else None
    extra = ("--profile", "slurm") if args.slurm else ()
    print("\n| slides | jobs | `snakemake -n` wall (s) | CPU (s) | load average |"
          + (" sbatch submissions |" if args.slurm else "")
          + (" first sbatch of a real run (s) |" if args.first_sbatch else "")
          + "\n|---:|---:|---:|---:|---:|" + ("---|" if args.slurm else "") + ("---:|" if args.first_sbatch else ""))
    for n in args.sizes:
        work = root / f"n{n}"
        make_placeholder_cohort(work, n)
        wall, cpu, text = min(dry_run(work, *extra, snakefile=args.snakefile, env=env)
                              for _ in range(args.repeat))
        row = f"| {n:,} | {job_total(text):,} | {wall:.1f} | {cpu:.1f} | {os.getloadavg()[0]:.1f} |"
        if args.slurm:
            sub = count_submissions(work, env, args.snakefile)
            sizes = sub.pop("group sizes")
            row += (f" {sum(sub.values()):,} ({', '.join(f'{k} {v}' for k, v in sorted(sub.items()))};"
                    f" jobs per bundle (min, max) {sizes}) |")
        if args.first_sbatch:
            row += f" {first_submission(work, env, args.snakefile):.1f} |"
        print(row, flush=True)
    if args.profile is not None:
        dry_run(root / f"n{args.sizes[-1]}", *extra, profile=args.profile, snakefile=args.snakefile, env=env)
        print(f"\ncProfile of the {args.sizes[-1]:,}-slide dry run: {args.profile}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
