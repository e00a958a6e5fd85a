"""Snakemake script of rule `run_summary`: slides included / excluded (and why), time per stage."""

from pathlib import Path

import pandas as pd

from slidesnake.io import setup_logging, write_table
from slidesnake.runsummary import log_summary, slide_table, stage_table
from slidesnake.samples import read_sheet

sm = snakemake  # noqa: F821
log = setup_logging(sm.log[0] if sm.log else None)
samples = read_sheet(sm.input.samples)
# results/tissue/<slide_id>/tiles.parquet
tissue = {Path(path).parent.name: path for path in sm.input.tissue}
mag = sm.params.magnification
excluded = pd.read_csv(sm.input.excluded, sep="\t", dtype=str, keep_default_na=False)
slides = slide_table(samples, tissue, None if mag is None else float(mag), excluded)
# Benchmark inputs are named bench_<stage> (one file or a list per rule), in pipeline order.
bench = {name[len("bench_"):]: getattr(sm.input, name) for name in sm.input.keys() if name.startswith("bench_")}
stages = stage_table({stage: [files] if isinstance(files, str) else list(files) for stage, files in bench.items()})
write_table(slides, sm.output.slides)
write_table(stages, sm.output.stages)
log_summary(slides, stages)
