# Coupled embedder and bag-classifier training (config training.coupling, ICMIL; docs/models.md).
# Per fold k and round r = 1..R: coupling_embedder fine-tunes the embedder on the confident tiles of
# the fold's training slides (labelled by round r-1's bag model), coupling_extract embeds every slide
# again with it (the normal extract_features script: the store records the embedder's path and
# sha256), coupling_train retrains the bag model (the normal train script). Round 0 is the usual
# features/ and models/. Every setting but `rounds` is a param of the round jobs, so adding a round
# runs only the new round's jobs, and no coupling setting ever reruns round 0.


rule coupling_embedder:
    input:
        splits=rules.make_splits.output.splits,
        model=lambda wc: round_file(wc.fold, int(wc.round) - 1, "model.pt"),
        # round r-1's features of every slide; only the fold's training slides are read
        stores=lambda wc: [round_store(wc.fold, int(wc.round) - 1, s) for s in SLIDES],
        embedder=_previous_embedder,
    output:
        weights=f"{COUPLING_DIR}/round_{{round}}/fold_{{fold}}/embedder.pth",
        info=f"{COUPLING_DIR}/round_{{round}}/fold_{{fold}}/embedder.json",
        labels=f"{COUPLING_DIR}/round_{{round}}/fold_{{fold}}/pseudo_labels.csv",
    log:
        f"{OUT}/logs/coupling_embedder/{MODEL}/round_{{round}}/fold_{{fold}}.log",
    benchmark:
        f"{OUT}/benchmarks/coupling_embedder/{MODEL}/round_{{round}}/fold_{{fold}}.tsv"
    conda:
        "../../envs/coupling.yaml"
    params:
        coupling=_COUPLING_STEP,
        classes=config["classes"],
        backbone=config["features"]["backbone"],
        weights=config["features"]["weights"],
        magnification=config["training"]["magnification"],
        slide_paths={s: _PATH[s] for s in SLIDES},
    script:
        "../../scripts/coupling_embedder.py"


rule coupling_extract:
    input:
        slide=slide_path,
        tiles=rules.filter_tissue.output.tiles,
        meta=rules.tile.output.meta,
        qc=rules.filter_tissue.output.qc,
        embedder=rules.coupling_embedder.output.weights,
    output:
        store=directory(f"{COUPLING_DIR}/round_{{round}}/fold_{{fold}}/features/{{slide}}.zarr"),
    log:
        f"{OUT}/logs/coupling_extract/{MODEL}/round_{{round}}/fold_{{fold}}/{{slide}}.log",
    benchmark:
        f"{OUT}/benchmarks/coupling_extract/{MODEL}/round_{{round}}/fold_{{fold}}/{{slide}}.tsv"
    conda:
        "../../envs/features.yaml"
    params:
        backbone=config["features"]["backbone"],
        weights=lambda wc, input: input.embedder,
        feature_dtype=config["features"]["feature_dtype"],
        backbone_options=BACKBONE_OPTIONS,
    script:
        "../../scripts/extract_features.py"


rule coupling_train:
    input:
        splits=rules.make_splits.output.splits,
        features=lambda wc: [round_store(wc.fold, wc.round, s) for s in SLIDES],
        samples=config["samples"],
    output:
        model=f"{COUPLING_DIR}/round_{{round}}/fold_{{fold}}/model.pt",
        history=f"{COUPLING_DIR}/round_{{round}}/fold_{{fold}}/history.csv",
        predictions=f"{COUPLING_DIR}/round_{{round}}/fold_{{fold}}/predictions.csv",
    log:
        f"{OUT}/logs/coupling_train/{MODEL}/round_{{round}}/fold_{{fold}}.log",
    benchmark:
        f"{OUT}/benchmarks/coupling_train/{MODEL}/round_{{round}}/fold_{{fold}}.tsv"
    conda:
        "../../envs/training.yaml"
    params:
        # the train rule's, bar TensorBoard (one log directory per round)
        **{**dict(rules.train.params.items()), "tensorboard": ""},
    script:
        "../../scripts/train.py"


rule coupling_summary:
    input:
        predictions=[round_file(k, r, "predictions.csv") for r in range(ROUNDS + 1) for k in FOLDS],
        models=[round_file(k, r, "model.pt") for r in range(ROUNDS + 1) for k in FOLDS],
        # localisation per round reads every round's stores (only with heatmap.annotations)
        stores=(
            [round_store(k, r, s) for r in range(ROUNDS + 1) for k in FOLDS for s in SLIDES]
            if config["heatmap"]["annotations"]
            else []
        ),
    output:
        csv=f"{OUT}/summary/{MODEL}/coupling_rounds.csv",
    log:
        f"{OUT}/logs/coupling_summary/{MODEL}.log",
    benchmark:
        f"{OUT}/benchmarks/coupling_summary/{MODEL}.tsv"
    conda:
        "../../envs/heatmaps.yaml"
    params:
        classes=config["classes"],
        rounds=ROUNDS,
        folds=FOLDS,
        annotations=config["heatmap"]["annotations"],
        magnification=config["training"]["magnification"],
        stores={
            str(r): {str(k): {s: round_store(k, r, s) for s in SLIDES} for k in FOLDS}
            for r in range(ROUNDS + 1)
        },
    script:
        "../../scripts/coupling_summary.py"
