rule extract_features:
    input:
        slide=slide_path,
        tiles=rules.filter_tissue.output.tiles,
        meta=rules.tile.output.meta,
        # the exclusion marker of filter_tissue (config on_bad_slide: skip)
        qc=rules.filter_tissue.output.qc,
        # the weights file(s) of features.weights: replacing them reruns extraction
        weights=weight_files,
        stain_reference=stain_reference_path,
    output:
        store=directory(f"{OUT}/features/{BACKBONE}/{{slide}}.zarr"),
    log:
        f"{OUT}/logs/extract_features/{BACKBONE}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/extract_features/{BACKBONE}/{{slide}}.tsv"
    conda:
        "../../envs/features.yaml"
    # Result-defining params only. features.batch_size, num_workers, device and compile shape how the
    # job runs, not what it computes: the script reads them from the config, so changing them
    # reruns nothing (docs/design.md, "Result-defining and run-shaping settings").
    params:
        backbone=config["features"]["backbone"],
        weights=config["features"]["weights"],
        feature_dtype=config["features"]["feature_dtype"],
        backbone_options=BACKBONE_OPTIONS,
        stain_normalisation=STAIN_NORM,
    script:
        "../../scripts/extract_features.py"


# Optional (features.stain_normalisation): the stain reference tiles are normalised to.
rule stain_reference:
    input:
        unpack(stain_reference_inputs),
    output:
        reference=f"{OUT}/features/stain_reference.json",
    log:
        f"{OUT}/logs/stain_reference.log",
    benchmark:
        f"{OUT}/benchmarks/stain_reference.tsv"
    conda:
        "../../envs/features.yaml"
    params:
        stain_normalisation=STAIN_NORM,
    script:
        "../../scripts/stain_reference.py"


# Every slide left out of training: excluded under on_bad_slide: skip (the stage and reason of the
# marker in its feature store), or with no tile at the training magnification(s) (an empty bag).
rule excluded_table:
    input:
        samples=config["samples"],
        stores=feature_stores,
    output:
        table=f"{OUT}/qc/excluded.tsv",
    log:
        f"{OUT}/logs/excluded_table.log",
    benchmark:
        f"{OUT}/benchmarks/excluded_table.tsv"
    conda:
        "../../envs/training.yaml"
    params:
        read_magnifications=READ_MAGNIFICATIONS,
    script:
        "../../scripts/excluded_table.py"
