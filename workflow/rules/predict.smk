# Inference on new slides with a trained run's fold models (config `predict`):
#   snakemake predict --configfile <the training config> <a config with predict.samples>
# The new slides (PREDICT_SLIDES, common.smk) are tiled, filtered and embedded by the usual per-slide
# rules. The fold checkpoints are read through params, with their sha256 (a retrained model makes the
# predictions stale), and are never inputs: this target can neither rebuild nor change them.
# The input functions and PREDICT_* are in common.smk.


rule predict:
    """Fold-ensemble predictions of the new slides and the record of the models used; the target
    `snakemake predict` (its heatmaps are inputs, so they come with it)."""
    input:
        stores=predict_stores,
        samples=predict_sheet,
        heatmaps=lambda wc: expand(f"{PREDICT_DIR}/heatmaps/{{slide}}.png", slide=PREDICT_SLIDES),
    output:
        predictions=f"{PREDICT_DIR}/predictions.csv",
        models=f"{PREDICT_DIR}/models.tsv",
    log:
        f"{OUT}/logs/predict/{config['predict']['name']}.log",
    benchmark:
        f"{OUT}/benchmarks/predict/{config['predict']['name']}.tsv"
    conda:
        "../../envs/training.yaml"
    params:
        models=predict_models,
        sha256=predict_model_sha256,
    script:
        "../../scripts/predict.py"


rule predict_heatmap:
    """Attention of the fold ensemble (the new slide is in no fold) over a new slide's thumbnail:
    scripts/heatmap.py, as rule heatmap, without splits."""
    input:
        slide=slide_path,
        store=f"{OUT}/features/{BACKBONE}/{{slide}}.zarr",
        samples=predict_sheet,
        case_stores=predict_patient_stores,
    output:
        png=f"{PREDICT_DIR}/heatmaps/{{slide}}.png",
        tiles=f"{PREDICT_DIR}/heatmaps/{{slide}}.tiles.csv",
        geojson=f"{PREDICT_DIR}/heatmaps/{{slide}}.geojson",
        top_tiles=f"{PREDICT_DIR}/heatmaps/{{slide}}.top_tiles.png",
    log:
        f"{OUT}/logs/predict_heatmap/{config['predict']['name']}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/predict_heatmap/{config['predict']['name']}/{{slide}}.tsv"
    conda:
        "../../envs/heatmaps.yaml"
    params:
        models=predict_models,
        sha256=predict_model_sha256,
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
