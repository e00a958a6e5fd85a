import os
import sys

import pandas as pd
from snakemake.utils import validate

# The package lives beside the rule scripts; importable without installation.
sys.path.insert(0, os.path.join(workflow.basedir, "..", "scripts"))
from slidesnake.samples import SampleSheetError, check_sheet, missing_files, read_sheet


validate(config, schema="../schemas/config.schema.yaml")

samples = read_sheet(config["samples"])
# Every row against the schema and the cross-row checks, all problems reported at once. Missing
# slide files are reported (all at once) when a job needs one, so that linting and dry runs of
# other targets work before the slides are in place.
check_sheet(samples, config["classes"], sheet=config["samples"], check_paths=False,
            schema=os.path.join(workflow.basedir, "schemas", "samples.schema.yaml"))
validate(samples, schema="../schemas/samples.schema.yaml")
MISSING = missing_files(samples)

OUT = config["outdir"]
SLIDES = list(samples["slide_id"])
BACKBONE = config["features"]["backbone"].replace(":", "-")
MODEL = config["training"]["model"]
FOLDS = list(range(config["splits"]["k"]))


wildcard_constraints:
    slide="[A-Za-z0-9][A-Za-z0-9._-]*",
    fold="[0-9]+",


def slide_path(wildcards):
    if wildcards.slide in MISSING:
        raise SampleSheetError(config["samples"], list(MISSING.values()))
    return samples.loc[wildcards.slide, "path"]


def slide_mpp(wildcards):
    mpp = samples.loc[wildcards.slide, "mpp"]
    return None if pd.isna(mpp) else float(mpp)


def feature_stores(wildcards=None):
    return expand(f"{OUT}/features/{BACKBONE}/{{slide}}.zarr", slide=SLIDES)


def fold_models(wildcards=None):
    return expand(f"{OUT}/models/{MODEL}/fold_{{fold}}/model.pt", fold=FOLDS)


def get_final_output():
    return [
        f"{OUT}/summary/{MODEL}/summary.csv",
        *expand(f"{OUT}/heatmaps/{MODEL}/{{slide}}.png", slide=SLIDES),
    ]
