# Folds are made from the slides that will be trained on: the sheet minus results/qc/excluded.tsv
# (excluded under on_bad_slide: skip, or an empty bag). So splits wait for every feature store, as
# training does anyway (docs/design.md, "Splits after exclusions").
rule make_splits:
    input:
        samples=config["samples"],
        excluded=rules.excluded_table.output.table,
    output:
        splits=f"{OUT}/splits/splits.csv",
    log:
        f"{OUT}/logs/make_splits.log",
    benchmark:
        f"{OUT}/benchmarks/make_splits.tsv"
    conda:
        "../../envs/training.yaml"
    params:
        k=config["splits"]["k"],
        seed=config["splits"]["seed"],
        test_fraction=config["splits"]["test_fraction"],
        site_preserved=config["splits"]["site_preserved"],
        classes=config["classes"],
    script:
        "../../scripts/make_splits.py"


rule train:
    input:
        splits=rules.make_splits.output.splits,
        features=feature_stores,
        # patient and stain of every slide (case bags of hierarchical models)
        samples=config["samples"],
    output:
        model=f"{OUT}/models/{MODEL}/fold_{{fold}}/model.pt",
        # its sha256 (sha256sum format), checked by predict and heatmap before the model is loaded
        model_sha256=f"{OUT}/models/{MODEL}/fold_{{fold}}/model.pt.sha256",
        history=f"{OUT}/models/{MODEL}/fold_{{fold}}/history.csv",
        predictions=f"{OUT}/models/{MODEL}/fold_{{fold}}/predictions.csv",
    log:
        f"{OUT}/logs/train/{MODEL}/fold_{{fold}}.log",
    benchmark:
        f"{OUT}/benchmarks/train/{MODEL}/fold_{{fold}}.tsv"
    conda:
        "../../envs/training.yaml"
    params:
        fold=lambda wc: int(wc.fold),
        model=MODEL,
        model_kwargs=config["training"]["model_kwargs"],
        magnification=config["training"]["magnification"],
        magnifications=TRAIN_MAGNIFICATIONS,
        classes=config["classes"],
        training={
            k: config["training"][k]
            for k in (
                "optimizer",
                "lr",
                "weight_decay",
                "epochs",
                "patience",
                "min_epochs",
                "class_weights",
                "seed",
            )
        },
        # TensorBoard event files, when config training.tensorboard: a log directory, not an output.
        # training.device and training.tensorboard are run-shaping: the script reads them from the
        # config, so changing them reruns nothing (docs/design.md).
        tensorboard_dir=lambda wc: f"{OUT}/logs/tensorboard/{MODEL}/fold_{wc.fold}",
    script:
        "../../scripts/train.py"


rule summarize:
    input:
        # the last coupling round's (training.coupling; 0 rounds: models/<model>/fold_<k>/)
        predictions=final_predictions(),
    output:
        summary=report(
            f"{OUT}/summary/{MODEL}/summary.csv",
            caption="../report/summary.rst",
            category="Cohort",
            subcategory=MODEL,
        ),
        summary_ci=report(
            f"{OUT}/summary/{MODEL}/summary_ci.csv",
            caption="../report/summary_ci.rst",
            category="Cohort",
            subcategory=MODEL,
        ),
        predictions=report(
            f"{OUT}/summary/{MODEL}/predictions.csv",
            caption="../report/predictions.rst",
            category="Cohort",
            subcategory=MODEL,
        ),
        roc=report(
            f"{OUT}/summary/{MODEL}/roc.png",
            caption="../report/roc.rst",
            category="Cohort",
            subcategory=MODEL,
        ),
        confusion=report(
            f"{OUT}/summary/{MODEL}/confusion.png",
            caption="../report/confusion.rst",
            category="Cohort",
            subcategory=MODEL,
        ),
    log:
        f"{OUT}/logs/summarize/{MODEL}.log",
    benchmark:
        f"{OUT}/benchmarks/summarize/{MODEL}.tsv"
    conda:
        "../../envs/training.yaml"
    params:
        classes=config["classes"],
        evaluation=config["evaluation"],
    script:
        "../../scripts/summarize.py"
