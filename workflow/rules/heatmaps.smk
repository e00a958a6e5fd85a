rule heatmap:
    input:
        slide=slide_path,
        store=f"{OUT}/features/{BACKBONE}/{{slide}}.zarr",
        splits=rules.make_splits.output.splits,
        models=fold_models,
    output:
        png=f"{OUT}/heatmaps/{MODEL}/{{slide}}.png",
    params:
        magnification=config["training"]["magnification"],
        thumbnail_size=config["heatmap"]["thumbnail_size"],
        alpha=config["heatmap"]["alpha"],
        cmap=config["heatmap"]["cmap"],
        percentiles=[config["heatmap"]["low_percentile"], config["heatmap"]["high_percentile"]],
    log:
        f"logs/heatmap/{MODEL}/{{slide}}.log",
    benchmark:
        f"benchmarks/heatmap/{MODEL}/{{slide}}.tsv"
    conda:
        "../../envs/heatmaps.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../../scripts/heatmap.py"
