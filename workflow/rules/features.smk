rule extract_features:
    input:
        slide=slide_path,
        tiles=rules.filter_tissue.output.tiles,
        meta=rules.tile.output.meta,
    output:
        store=directory(f"{OUT}/features/{BACKBONE}/{{slide}}.zarr"),
    params:
        backbone=config["features"]["backbone"],
        weights=config["features"]["weights"],
        batch_size=config["features"]["batch_size"],
        num_workers=config["features"]["num_workers"],
        device=config["features"]["device"],
        feature_dtype=config["features"]["feature_dtype"],
    log:
        f"logs/extract_features/{BACKBONE}/{{slide}}.log",
    benchmark:
        f"benchmarks/extract_features/{BACKBONE}/{{slide}}.tsv"
    conda:
        "../../envs/features.yaml"
    threads: config["features"]["threads"]
    resources:
        mem_mb=config["features"]["mem_mb"],
        runtime=120,
        gpu=config["features"]["gpu"],
    script:
        "../../scripts/extract_features.py"
