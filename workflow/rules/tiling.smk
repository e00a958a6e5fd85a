rule tile:
    input:
        slide=slide_path,
    output:
        grid=f"{OUT}/tiles/{{slide}}/grid.parquet",
        meta=f"{OUT}/tiles/{{slide}}/slide.json",
    log:
        f"{OUT}/logs/tile/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/tile/{{slide}}.tsv"
    conda:
        "../../envs/tiling.yaml"
    params:
        mpp=slide_mpp,
        magnifications=config["tiling"]["magnifications"],  # entries: 20, "20x" or "0.5um"
        tile_size=config["tiling"]["tile_size"],
        overlap=config["tiling"]["overlap"],
        limit_bounds=config["tiling"]["limit_bounds"],
        allow_upsample=config["tiling"]["allow_upsample"],
        default_mpp=config["tiling"]["default_mpp"],
        default_objective=config["tiling"]["default_objective"],
        reader=config["tiling"]["reader"],
    script:
        "../../scripts/tile.py"


rule filter_tissue:
    input:
        slide=slide_path,
        grid=rules.tile.output.grid,
        meta=rules.tile.output.meta,
    output:
        tiles=f"{OUT}/tissue/{{slide}}/tiles.parquet",
        thumbnail=report(
            f"{OUT}/qc/{{slide}}/thumbnail.png",
            caption="../report/qc_thumbnail.rst",
            category="Tissue QC",
            labels=slide_labels,
        ),
        geojson=f"{OUT}/qc/{{slide}}/tissue.geojson",
        qc=f"{OUT}/qc/{{slide}}/qc.json",
    log:
        f"{OUT}/logs/filter_tissue/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/filter_tissue/{{slide}}.tsv"
    conda:
        "../../envs/tiling.yaml"
    # tissue.thumbnail_size only sizes the QC picture: read by the script from the config (run-shaping,
    # docs/design.md), so changing it does not rerun the filter, extraction and training after it.
    params:
        tissue={k: v for k, v in config["tissue"].items() if k != "thumbnail_size"},
        stain=slide_stain,
    script:
        "../../scripts/filter_tissue.py"


rule qc_table:
    input:
        qc=cohort_files(rules.filter_tissue.output.qc),
    output:
        table=report(
            f"{OUT}/qc/slides.tsv",
            caption="../report/qc_table.rst",
            category="Tissue QC",
        ),
        audit=f"{OUT}/qc/cohort.tsv",
        html=report(f"{OUT}/qc/cohort.html", caption="../report/cohort_audit.rst", category="Tissue QC"),
    log:
        f"{OUT}/logs/qc_table.log",
    benchmark:
        f"{OUT}/benchmarks/qc_table.tsv"
    conda:
        "../../envs/tiling.yaml"
    params:
        sheet=audit_sheet(),
    script:
        "../../scripts/qc_table.py"


# Optional (config export_tiles.enabled): kept tiles as image files in CMA-MIL's layout, one
# directory per magnification: patches_<mag>x/<label>/<slide_id>/<col>_<row>.<format>.
rule export_tiles:
    input:
        slide=slide_path,
        tiles=rules.filter_tissue.output.tiles,
        meta=rules.tile.output.meta,
    output:
        [directory(f"{OUT}/patches/patches_{mag_label(m)}/{{label}}/{{slide}}") for m in TILE_MAGNIFICATIONS],
    log:
        f"{OUT}/logs/export_tiles/{{label}}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/export_tiles/{{label}}/{{slide}}.tsv"
    wildcard_constraints:
        label="[^/]+",
    conda:
        "../../envs/tiling.yaml"
    params:
        magnifications=TILE_MAGNIFICATIONS,
        format=config["export_tiles"]["format"],
        quality=config["export_tiles"]["quality"],
    script:
        "../../scripts/export_tiles.py"
