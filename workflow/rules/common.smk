import os
import sys

import pandas as pd
from snakemake.utils import validate

# The package lives beside the rule scripts; importable without installation.
sys.path.insert(0, os.path.join(workflow.basedir, "..", "scripts"))
from slidesnake.config import check_coupling_model, load_config, registered_names, validate_schema
from slidesnake.io import sha256_file
from slidesnake.predict import fold_checkpoints
from slidesnake.presets import PRESETS, backbone_dirname, check_backbone_name
from slidesnake.samples import (
    SampleSheetError,
    check_predict_sheet,
    check_sheet,
    missing_files,
    read_predict_sheet,
    read_sheet,
)
from slidesnake.tiling import mag_label

# Threads and resources are Snakemake's, set per rule in the workflow profile
# (workflow/profiles/default/config.yaml), no longer in the config: say so rather than "unknown key".
_moved = [
    f"{section}.{key}"
    for section in ("tiling", "tissue", "features", "training")
    for key in ("threads", "mem_mb", "gpu")
    if key in (config.get(section) or {})
]
if _moved:
    raise ValueError(
        f"config keys {', '.join(_moved)} are no longer read: every rule's threads, mem_mb, runtime "
        "and gpu come from the workflow profile workflow/profiles/default/config.yaml; override them "
        "with e.g. --set-threads extract_features=8 --set-resources extract_features:mem_mb=16000"
    )
# Types, ranges and unknown keys, one line per problem naming the key (Snakemake's validate would
# print the whole schema after it); then Snakemake's validate fills in the schema's defaults.
validate_schema(config, os.path.join(workflow.basedir, "schemas", "config.schema.yaml"))
validate(config, schema="../schemas/config.schema.yaml")
if config["training"]["coupling"]["rounds"]:  # before the other checks: the one line that applies
    check_coupling_model(config["training"]["model"])

# A killed run leaves Snakemake's lock behind, and the next run stops with a LockException: say
# what to do in one line (docs/reliability.md). Only the main process (not a cluster job) says it.
if workflow.is_main_process and os.path.isdir(".snakemake/locks") and os.listdir(".snakemake/locks"):
    print(
        "slidesnake: this directory holds a Snakemake lock; if no other snakemake runs here (a killed "
        "run leaves it behind), run `snakemake --unlock` with the same options, then run again",
        file=sys.stderr,
    )

samples = read_sheet(config["samples"])
# Every row against the schema and the cross-row checks, all problems reported at once. Missing
# slide files are reported (all at once) when a job needs one, so that linting and dry runs of
# other targets work before the slides are in place.
check_sheet(
    samples,
    config["classes"],
    sheet=config["samples"],
    check_paths=False,
    schema=os.path.join(workflow.basedir, "schemas", "samples.schema.yaml"),
)
validate(samples, schema="../schemas/samples.schema.yaml")
# Typed config sections and the cross-field checks (registries, magnifications, k against the
# patients of each class): mistakes stop here, before any job, in one line (slidesnake.config).
# The sheet-against-k checks are left out only when every target is a per-slide or QC output (tiles,
# tissue, features, qc), and under --lint (which checks the workflow, not a cohort): such targets
# work with any sheet. (Snakemake sets its targets after parsing: the command line is read here.)
_ARGS = [a for a in sys.argv[1:] if not a.startswith("-")]
_PER_SLIDE_ONLY = (
    "--lint" in sys.argv
    or any(d in a.split(os.sep)[:-1] for a in _ARGS for d in ("tiles", "tissue", "features", "qc"))
    and not any(
        a in ("all", "predict") or a.endswith(("splits.csv", "summary.csv", "model.pt")) for a in _ARGS
    )
)
CFG = load_config(
    config,
    os.path.join(workflow.basedir, "schemas", "config.schema.yaml"),
    None if _PER_SLIDE_ONLY else samples,
)
MISSING = missing_files(samples)
if MISSING and config["on_bad_slide"] == "skip":
    print(
        f"on_bad_slide: skip -- {len(MISSING)} slide file(s) not found; they are excluded "
        f"({config['outdir']}/qc/excluded.tsv):\n  " + "\n  ".join(MISSING.values()),
        file=sys.stderr,
    )

OUT = config["outdir"]
SLIDES = list(samples["slide_id"])
# Output folder of the backbone: any name made safe (no slash nesting, no colon); hub names refused here.
check_backbone_name(config["features"]["backbone"])
BACKBONE = backbone_dirname(config["features"]["backbone"])
MODEL = config["training"]["model"]
FOLDS = list(range(config["splits"]["k"]))
# Tiled magnifications as numbers: entries "0.5um" (pixel-size targets) are named by their nominal
# magnification 10 / mpp (20x); two entries naming one magnification are an error here.
TILE_MAGNIFICATIONS = CFG.tile_magnifications
# Magnifications read by multiscale models (bag_type "multiscale"): default every tiled one.
TRAIN_MAGNIFICATIONS = config["training"]["magnifications"] or TILE_MAGNIFICATIONS
# The magnifications whose tiles the model reads (a slide without a tile there is excluded): the
# param of excluded_table, so that switching between models that read the same magnifications
# reruns neither it nor make_splits (whose folds leave the excluded slides out).
READ_MAGNIFICATIONS = (
    [float(m) for m in TRAIN_MAGNIFICATIONS]
    if registered_names("model").get(MODEL) == "multiscale"
    else [float(config["training"]["magnification"])]
)


wildcard_constraints:
    slide="[A-Za-z0-9][A-Za-z0-9._-]*",
    fold="[0-9]+",
    round="[0-9]+",


# Per-slide lookups as dicts: input functions run once per job while the DAG is built, and a
# pandas .loc per call costs ~100 us (seconds for thousands of slides; docs/benchmarks.md).
_PATH = dict(zip(samples["slide_id"], samples["path"]))
_MPP = {s: None if pd.isna(m) else float(m) for s, m in zip(samples["slide_id"], samples["mpp"])}
_PATIENT = dict(zip(samples["slide_id"], samples["patient_id"]))
_LABEL = dict(zip(samples["slide_id"], samples["label"]))
# optional `stain` column: tells filter_tissue a fluorescence slide (tissue.modality: auto)
_STAIN = {
    s: (None if pd.isna(t) else str(t))
    for s, t in zip(samples["slide_id"], samples.get("stain", [None] * len(samples)))
}
_PATIENT_SLIDES = {}
for _s, _p in _PATIENT.items():
    _PATIENT_SLIDES.setdefault(_p, []).append(_s)

# New slides to predict (config predict.samples, target `predict`, rules/predict.smk): a sheet without
# labels, validated against its own schema. The same per-slide rules (tile, filter_tissue,
# extract_features) make their outputs, so the lookups above learn their paths and MPPs; a slide id
# in both sheets must name the same file. `all` never asks for them.
PREDICT_SHEET = config["predict"]["samples"]
PREDICT_SLIDES, PREDICT_MISSING, _PREDICT_PATIENT = [], {}, {}
if PREDICT_SHEET:
    if not os.path.isfile(PREDICT_SHEET):
        raise SampleSheetError(
            PREDICT_SHEET,
            [
                "file not found; fix config predict.samples (relative paths "
                "are relative to the working directory) or set it to null"
            ],
        )
    predict_samples = read_predict_sheet(PREDICT_SHEET)
    check_predict_sheet(
        predict_samples,
        PREDICT_SHEET,
        training=samples,
        schema=os.path.join(workflow.basedir, "schemas", "predict_samples.schema.yaml"),
    )
    PREDICT_SLIDES = list(predict_samples["slide_id"])
    PREDICT_MISSING = missing_files(predict_samples)
    if PREDICT_MISSING and config["on_bad_slide"] == "skip":
        print(
            f"on_bad_slide: skip -- {len(PREDICT_MISSING)} file(s) of the predict sheet not found; they are "
            "excluded:\n  " + "\n  ".join(PREDICT_MISSING.values()),
            file=sys.stderr,
        )
    _PREDICT_PATIENT = dict(zip(predict_samples["slide_id"], predict_samples["patient_id"]))
    for _s, _path, _m in zip(predict_samples["slide_id"], predict_samples["path"], predict_samples["mpp"]):
        _PATH.setdefault(_s, _path)
        _MPP.setdefault(_s, None if pd.isna(_m) else float(_m))


def slide_path(wildcards):
    if wildcards.slide in MISSING:
        if config["on_bad_slide"] == "skip":
            return []  # no input: rule tile excludes the slide ("file not found"), later rules pass it on
        raise SampleSheetError(config["samples"], list(MISSING.values()))
    if wildcards.slide in PREDICT_MISSING:
        if config["on_bad_slide"] == "skip":
            return []  # as above: its prediction row and heatmap say why
        raise SampleSheetError(PREDICT_SHEET, list(PREDICT_MISSING.values()))
    return _PATH[wildcards.slide]


def slide_mpp(wildcards):
    return _MPP[wildcards.slide]


def slide_stain(wildcards):
    return _STAIN.get(wildcards.slide)


STAIN_NORM = config["features"]["stain_normalisation"]
if (
    STAIN_NORM["method"] != "none"
    and STAIN_NORM["reference"] != "cohort"
    and STAIN_NORM["reference"] not in _PATH
):
    raise ValueError(
        f"config features.stain_normalisation.reference {STAIN_NORM['reference']!r} is neither 'cohort' nor a "
        "slide_id of the sample sheet; fix it"
    )
if STAIN_NORM["method"] == "reinhard" and STAIN_NORM["reference"] == "cohort":
    raise ValueError(
        "config features.stain_normalisation: reinhard needs a reference slide (reference: <slide_id>); "
        "'cohort' is for macenko"
    )


def stain_reference_path(wildcards=None):
    """features/stain_reference.json when stain normalisation is on (an input of extract_features), else []."""
    return [] if STAIN_NORM["method"] == "none" else [f"{OUT}/features/stain_reference.json"]


def stain_reference_inputs(wildcards=None):
    ref = STAIN_NORM["reference"]
    if ref == "cohort":
        return {"qc": expand(f"{OUT}/qc/{{slide}}/qc.json", slide=SLIDES)}
    return {"meta": f"{OUT}/tiles/{ref}/slide.json", "slide": _PATH[ref]}


def audit_sheet():
    """The sheet columns the cohort audit (in qc_table) reads, as records; a param, so that a
    relabelled slide reruns the audit, not the tiling."""
    cols = [c for c in ("slide_id", "patient_id", "label", "site") if c in samples.columns]
    return samples[cols].astype(str).to_dict("records")


def cohort_files(pattern):
    """Input function: ``pattern`` expanded over the cohort's slides.

    Cohort-wide inputs are functions, not lists: Snakemake looks a list input up once per file it
    holds (hashing the whole list each time) while it builds the DAG, when the rule also names
    another rule's output (``rules.<name>.output``): quadratic in the cohort, 2.9 s of a
    2,000-slide plan for run_summary alone, 0.3 s as a function (docs/benchmarks.md, "Planning time
    on an idle machine").
    """

    def files(wildcards=None):
        return expand(pattern, slide=SLIDES)

    return files


feature_stores = cohort_files(f"{OUT}/features/{BACKBONE}/{{slide}}.zarr")


def patient_stores(wildcards):
    """Feature stores of every slide of the slide's patient (the case bag of hierarchical models)."""
    ids = _PATIENT_SLIDES[_PATIENT[wildcards.slide]]
    return [f"{OUT}/features/{BACKBONE}/{s}.zarr" for s in ids]


def slide_labels(wildcards):
    """Columns of a slide's entry in the report galleries."""
    s = wildcards.slide
    if s not in _LABEL:  # a new slide of the predict sheet
        return {"slide": s, "patient": _PREDICT_PATIENT[s], "label": "none (predict)"}
    return {"slide": s, "patient": _PATIENT[s], "label": _LABEL[s]}


def fold_models(wildcards=None):
    # the last coupling round's (training.coupling.rounds; 0: the usual models)
    return [round_file(k, config["training"]["coupling"]["rounds"], "model.pt") for k in FOLDS]


def exported_tiles(wildcards=None):
    """Tile export directories (rule export_tiles) of every slide, when config export_tiles.enabled."""
    if not config["export_tiles"]["enabled"]:
        return []
    return [
        f"{OUT}/patches/patches_{mag_label(m)}/{samples.loc[s, 'label']}/{s}"
        for s in SLIDES
        for m in TILE_MAGNIFICATIONS
    ]


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
        *(
            expand(f"{OUT}/heatmaps/{MODEL}/{{slide}}.heatmap.svs", slide=SLIDES)
            if config["heatmap"]["pyramid"]
            else []
        ),
        f"{OUT}/run_summary/slides.tsv",
        f"{OUT}/qc/slides.tsv",
        f"{OUT}/qc/excluded.tsv",
        *exported_tiles(),
        *([f"{OUT}/summary/{MODEL}/coupling_rounds.csv"] if ROUNDS else []),
    ]


# --------------------------------------------------------------------------- predict (rules/predict.smk)
# The fold checkpoints are read through params, with their sha256, never inputs.
PREDICT_DIR = f"{OUT}/predict/{config['predict']['name']}"
PREDICT_MODELS_DIR = config["predict"]["models"] or f"{OUT}/models/{MODEL}"
_PREDICT_PATIENT_SLIDES = {}
for _s, _p in _PREDICT_PATIENT.items():
    _PREDICT_PATIENT_SLIDES.setdefault(_p, []).append(_s)
_SHA256 = {}


def predict_sheet(wildcards=None):
    """Input of the predict rules: the predict sheet; checks, while the DAG is built (before any job
    runs), that the sheet is configured and the run's models exist."""
    if not PREDICT_SHEET:
        raise ValueError(
            "target predict needs config predict.samples: a sheet (TSV) of the new slides with "
            "slide_id and path (see config/config.yaml, section predict)"
        )
    predict_models()
    return PREDICT_SHEET


def predict_models(wildcards=None):
    """The run's fold_<k>/model.pt (one-line error naming a missing one: train first)."""
    return fold_checkpoints(PREDICT_MODELS_DIR, FOLDS)


def predict_model_sha256(wildcards=None):
    """sha256 of every fold checkpoint, once per (path, size, mtime) and Snakemake invocation."""
    out = []
    for path in predict_models():
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in _SHA256:
            _SHA256[key] = sha256_file(path)
        out.append(_SHA256[key])
    return out


def predict_stores(wildcards=None):
    predict_sheet()
    return expand(f"{OUT}/features/{BACKBONE}/{{slide}}.zarr", slide=PREDICT_SLIDES)


def predict_patient_stores(wildcards):
    """Feature stores of every new slide of the slide's patient (case bags of hierarchical models)."""
    ids = _PREDICT_PATIENT_SLIDES[_PREDICT_PATIENT[wildcards.slide]]
    return [f"{OUT}/features/{BACKBONE}/{s}.zarr" for s in ids]


# --------------------------------------------------------------------------- coupling (rules/coupling.smk)
# training.coupling.rounds R > 0: per fold and round r = 1..R an embedder step, the fold's slides
# embedded again and the bag model retrained, under coupling/<model>/round_<r>/fold_<k>/. Round 0 is
# the usual pipeline (features/<backbone>/, models/<model>/fold_<k>/). The usual summary and the
# heatmaps then come from round R.
COUPLING = config["training"]["coupling"]
ROUNDS = COUPLING["rounds"]
COUPLING_DIR = f"{OUT}/coupling/{MODEL}"


# Every coupling setting but `rounds` is a param of the round jobs (rules/coupling.smk).
_COUPLING_STEP = {k: v for k, v in COUPLING.items() if k != "rounds"}


def _previous_embedder(wildcards):
    """Round r-1's embedder weights (round 1 starts from features.weights: no input)."""
    r = int(wildcards.round)
    return [] if r == 1 else f"{COUPLING_DIR}/round_{r - 1}/fold_{wildcards.fold}/embedder.pth"


def round_store(fold, rnd, slide):
    if int(rnd) == 0:
        return f"{OUT}/features/{BACKBONE}/{slide}.zarr"
    return f"{COUPLING_DIR}/round_{rnd}/fold_{fold}/features/{slide}.zarr"


def round_file(fold, rnd, name):
    """model.pt, history.csv or predictions.csv of fold ``fold`` in round ``rnd``."""
    if int(rnd) == 0:
        return f"{OUT}/models/{MODEL}/fold_{fold}/{name}"
    return f"{COUPLING_DIR}/round_{rnd}/fold_{fold}/{name}"


def final_predictions(wildcards=None):
    return [round_file(k, ROUNDS, "predictions.csv") for k in FOLDS]


def heatmap_store(wildcards):
    """The slide's store; with coupling, its last-round store of every fold (heatmap.py takes the
    out-of-fold one)."""
    if not ROUNDS:
        return f"{OUT}/features/{BACKBONE}/{wildcards.slide}.zarr"
    return [round_store(k, ROUNDS, wildcards.slide) for k in FOLDS]


# --------------------------------------------------------------------------- features (rules/features.smk)
def weight_files(wildcards=None):
    """The files of features.weights (a file, an HF model folder or cache snapshot: config.json and
    every shard) as inputs of extract_features: replacing one reruns extraction. "none" and
    "imagenet" (torchvision's cache) have none. A missing file is reported while the DAG is built."""
    from slidesnake.weightfiles import resolve_weight_files

    weights = str(config["features"]["weights"])
    if weights in ("none", "imagenet"):
        return []
    preset = PRESETS.get(config["features"]["backbone"])
    return resolve_weight_files(weights, preset.files if preset else ()).inputs


# Options of the backbone (features.backbone_kwargs, mean, std, pooling, strip_prefix), passed to
# slidesnake.backbones.create_backbone; null ones are left out. features.weights_sha256 is read by the
# job from the config (pinning the same file must not rerun extraction).
BACKBONE_OPTIONS = {
    k: config["features"][k]
    for k in ("backbone_kwargs", "mean", "std", "pooling", "strip_prefix")
    if config["features"].get(k) not in (None, {})
}
