rule heatmap:
    input:
        slide=slide_path,
        # with training.coupling, the slide's last-round store of every fold
        store=heatmap_store,
        splits=rules.make_splits.output.splits,
        # The fold models (params.models) come with the cohort summary: its job runs after every
        # train job (which writes model.pt with predictions.csv). Listing the K models here instead
        # makes DAG building quadratic in the cohort size (Snakemake scans each train job's
        # N-slide input list once per heatmap; see docs/benchmarks.md).
        summary=rules.summarize.output.summary,
        # the whole case, for hierarchical (patient-level) models
        samples=config["samples"],
        case_stores=patient_stores,
    output:
        png=report(
            f"{OUT}/heatmaps/{MODEL}/{{slide}}.png",
            caption="../report/heatmap.rst",
            category="Heatmaps",
            subcategory=lambda wildcards: f"label: {_LABEL[wildcards.slide]}",
            labels=slide_labels,
        ),
        tiles=f"{OUT}/heatmaps/{MODEL}/{{slide}}.tiles.csv",
        geojson=f"{OUT}/heatmaps/{MODEL}/{{slide}}.geojson",
        top_tiles=f"{OUT}/heatmaps/{MODEL}/{{slide}}.top_tiles.png",
    log:
        f"{OUT}/logs/heatmap/{MODEL}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/heatmap/{MODEL}/{{slide}}.tsv"
    conda:
        "../../envs/heatmaps.yaml"
    params:
        models=fold_models(),
        magnification=config["training"]["magnification"],
        magnifications=TRAIN_MAGNIFICATIONS,
        thumbnail_size=config["heatmap"]["thumbnail_size"],
        alpha=config["heatmap"]["alpha"],
        cmap=config["heatmap"]["cmap"],
        percentiles=[config["heatmap"]["low_percentile"], config["heatmap"]["high_percentile"]],
        scale=[config["heatmap"]["scale"], config["heatmap"]["uniform_range"]],
        smooth_sigma=config["heatmap"]["smooth_sigma"],
        top_k=config["heatmap"]["top_k"],
        patch_predictions=config["heatmap"]["patch_predictions"],
    script:
        "../../scripts/heatmap.py"


rule localisation:
    """Per-slide ROC AUC of tile attention against the annotated regions (config heatmap.annotations)."""
    input:
        tiles=cohort_files(f"{OUT}/heatmaps/{MODEL}/{{slide}}.tiles.csv"),
        annotations=annotation_files,
        samples=config["samples"],
    output:
        csv=f"{OUT}/heatmaps/{MODEL}/localisation.csv",
    log:
        f"{OUT}/logs/localisation/{MODEL}.log",
    benchmark:
        f"{OUT}/benchmarks/localisation/{MODEL}.tsv"
    conda:
        "../../envs/heatmaps.yaml"
    params:
        annotations=config["heatmap"]["annotations"],
    script:
        "../../scripts/localisation.py"


rule heatmap_pyramid:
    """Optional (config heatmap.pyramid): the heatmap as a pyramidal TIFF on the slide's level-0 grid."""
    input:
        tiles=f"{OUT}/heatmaps/{MODEL}/{{slide}}.tiles.csv",
        # level-0 size, MPP and objective as resolved for tiling (sheet override included), or the
        # exclusion marker (on_bad_slide: skip): the slide itself is not read
        meta=rules.tile.output.meta,
    output:
        tiff=f"{OUT}/heatmaps/{MODEL}/{{slide}}.heatmap.svs",
    log:
        f"{OUT}/logs/heatmap_pyramid/{MODEL}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/heatmap_pyramid/{MODEL}/{{slide}}.tsv"
    conda:
        "../../envs/heatmaps.yaml"
    params:
        cmap=config["heatmap"]["cmap"],
    script:
        "../../scripts/heatmap_pyramid.py"
