"""A small completed run of the whole workflow, shared (read-only) by the rerun and SLURM tests.

6 patients with one slide each (3 per class, the fewest that k = 3 patient-level folds allow), tiny
slides, resnet18_trunc, 3 epochs, everything on CPU. The session fixture ``small_run`` in
conftest.py builds it once; tests copy it (``cp -a``) or compare against it, never change it.
"""

from __future__ import annotations

from pathlib import Path

from slidesnake.demo import make_cohort
from test_workflow import snakemake, write_config

# One thread per job everywhere: the SLURM test's run (--max-threads 1 on a 2-CPU node) then
# computes features and trains exactly as this local run does, bit for bit.
LOCAL_ARGS = ("--cores", "2", "--max-threads", "1")
CONFIG = dict(features={"device": "cpu"},
              training={"epochs": 3, "patience": 2, "min_epochs": 1, "device": "cpu"})


def make_small_cohort(workdir: Path) -> list[str]:
    """Cohort (slide paths relative to ``workdir``) and config.yaml in ``workdir``; the slide ids."""
    sheet = make_cohort(workdir / "cohort", n_patients=6, slides_per_patient=(1, 1), size=1200, seed=5)
    sheet["path"] = [str(Path(p).relative_to(workdir)) for p in sheet["path"]]
    sheet.to_csv(workdir / "cohort" / "samples.tsv", sep="\t", index=False)
    write_config(workdir, **CONFIG)
    return list(sheet["slide_id"])


def build_small_run(workdir: Path) -> Path:
    make_small_cohort(workdir)
    snakemake(workdir, *LOCAL_ARGS)
    return workdir
