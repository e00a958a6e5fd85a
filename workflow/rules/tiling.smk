rule tile:
    input:
        slide=slide_path,
    output:
        grid=f"{OUT}/tiles/{{slide}}/grid.parquet",
        meta=f"{OUT}/tiles/{{slide}}/slide.json",
    params:
        mpp=slide_mpp,
        magnifications=config["tiling"]["magnifications"],
        tile_size=config["tiling"]["tile_size"],
        overlap=config["tiling"]["overlap"],
        limit_bounds=config["tiling"]["limit_bounds"],
        allow_upsample=config["tiling"]["allow_upsample"],
        default_mpp=config["tiling"]["default_mpp"],
        default_objective=config["tiling"]["default_objective"],
    log:
        "logs/tile/{slide}.log",
    benchmark:
        "benchmarks/tile/{slide}.tsv"
    conda:
        "../../envs/tiling.yaml"
    threads: 1
    resources:
        mem_mb=config["tiling"]["mem_mb"],
        runtime=30,
    script:
        "../../scripts/tile.py"


rule filter_tissue:
    input:
        slide=slide_path,
        grid=rules.tile.output.grid,
        meta=rules.tile.output.meta,
    output:
        tiles=f"{OUT}/tissue/{{slide}}/tiles.parquet",
        thumbnail=f"{OUT}/qc/{{slide}}/thumbnail.png",
    params:
        edge_threshold=config["tissue"]["edge_threshold"],
        thumbnail_size=config["tissue"]["thumbnail_size"],
    log:
        "logs/filter_tissue/{slide}.log",
    benchmark:
        "benchmarks/filter_tissue/{slide}.tsv"
    conda:
        "../../envs/tiling.yaml"
    threads: config["tissue"]["threads"]
    resources:
        mem_mb=config["tissue"]["mem_mb"],
        runtime=60,
    script:
        "../../scripts/filter_tissue.py"
