import os
import sys

import pandas as pd
from snakemake.utils import validate

# The package lives beside the rule scripts; importable without installation.
sys.path.insert(0, os.path.join(workflow.basedir, "..", "scripts"))
from slidesnake.samples import SampleSheetError, check_sheet, missing_files, read_sheet
from slidesnake.tiling import mag_label, parse_targets


# Threads and resources are Snakemake's, set per rule in the workflow profile
# (workflow/profiles/default/config.yaml), no longer in the config: say so rather than "unknown key".
_moved = [f"{section}.{key}" for section in ("tiling", "tissue", "features", "training")
          for key in ("threads", "mem_mb", "gpu") if key in (config.get(section) or {})]
if _moved:
    raise ValueError(
        f"config keys {', '.join(_moved)} are no longer read: every rule's threads, mem_mb, runtime "
        "and gpu come from the workflow profile workflow/profiles/default/config.yaml; override them "
        "with e.g. --set-threads extract_features=8 --set-resources extract_features:mem_mb=16000")
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
# Tiled magnifications as numbers: entries "0.5um" (pixel-size targets) are named by their nominal
# magnification 10 / mpp (20x); two entries naming one magnification are an error here.
TILE_MAGNIFICATIONS = [t.magnification for t in parse_targets(config["tiling"]["magnifications"])]
# Magnifications read by multiscale models (bag_type "multiscale"): default every tiled one.
TRAIN_MAGNIFICATIONS = config["training"].get("magnifications") or TILE_MAGNIFICATIONS


wildcard_constraints:
    slide="[A-Za-z0-9][A-Za-z0-9._-]*",
    fold="[0-9]+",


# Per-slide lookups as dicts: input functions run once per job while the DAG is built, and a
# pandas .loc per call costs ~100 us (seconds for thousands of slides; docs/benchmarks.md).
_PATH = dict(zip(samples["slide_id"], samples["path"]))
_MPP = {s: None if pd.isna(m) else float(m) for s, m in zip(samples["slide_id"], samples["mpp"])}
_PATIENT = dict(zip(samples["slide_id"], samples["patient_id"]))
_LABEL = dict(zip(samples["slide_id"], samples["label"]))
_PATIENT_SLIDES = {}
for _s, _p in _PATIENT.items():
    _PATIENT_SLIDES.setdefault(_p, []).append(_s)


def slide_path(wildcards):
    if wildcards.slide in MISSING:
        raise SampleSheetError(config["samples"], list(MISSING.values()))
    return _PATH[wildcards.slide]


def slide_mpp(wildcards):
    return _MPP[wildcards.slide]


def feature_stores(wildcards=None):
    return expand(f"{OUT}/features/{BACKBONE}/{{slide}}.zarr", slide=SLIDES)


def patient_stores(wildcards):
    """Feature stores of every slide of the slide's patient (the case bag of hierarchical models)."""
    ids = _PATIENT_SLIDES[_PATIENT[wildcards.slide]]
    return [f"{OUT}/features/{BACKBONE}/{s}.zarr" for s in ids]


def slide_labels(wildcards):
    """Columns of a slide's entry in the report galleries."""
    s = wildcards.slide
    return {"slide": s, "patient": _PATIENT[s], "label": _LABEL[s]}


def fold_models(wildcards=None):
    return expand(f"{OUT}/models/{MODEL}/fold_{{fold}}/model.pt", fold=FOLDS)


def exported_tiles(wildcards=None):
    """Tile export directories (rule export_tiles) of every slide, when config export_tiles.enabled."""
    if not config["export_tiles"]["enabled"]:
        return []
    return [f"{OUT}/patches/patches_{mag_label(m)}/{samples.loc[s, 'label']}/{s}"
            for s in SLIDES for m in TILE_MAGNIFICATIONS]


def annotation_files(wildcards=None):
    """The <slide_id>.geojson region annotations (config heatmap.annotations) that exist."""
    folder = config["heatmap"]["annotations"]
    if not folder:
        return []
    return [p for p in (os.path.join(folder, f"{s}.geojson") for s in SLIDES) if os.path.exists(p)]


def get_final_output():
    return [
        f"{OUT}/summary/{MODEL}/summary.csv",
        *expand(f"{OUT}/heatmaps/{MODEL}/{{slide}}.png", slide=SLIDES),
        *([f"{OUT}/heatmaps/{MODEL}/localisation.csv"] if config["heatmap"]["annotations"] else []),
        *(expand(f"{OUT}/heatmaps/{MODEL}/{{slide}}.heatmap.svs", slide=SLIDES) if config["heatmap"]["pyramid"] else []),
        f"{OUT}/run_summary/slides.tsv",
        f"{OUT}/qc/slides.tsv",
        *exported_tiles(),
    ]
