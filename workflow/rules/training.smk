rule make_splits:
    input:
        samples=config["samples"],
    output:
        splits=f"{OUT}/splits/splits.csv",
    params:
        k=config["splits"]["k"],
        seed=config["splits"]["seed"],
        test_fraction=config["splits"]["test_fraction"],
        classes=config["classes"],
    log:
        "logs/make_splits.log",
    benchmark:
        "benchmarks/make_splits.tsv"
    conda:
        "../../envs/training.yaml"
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
        history=f"{OUT}/models/{MODEL}/fold_{{fold}}/history.csv",
        predictions=f"{OUT}/models/{MODEL}/fold_{{fold}}/predictions.csv",
    params:
        fold=lambda wc: int(wc.fold),
        model=MODEL,
        model_kwargs=config["training"]["model_kwargs"],
        magnification=config["training"]["magnification"],
        magnifications=TRAIN_MAGNIFICATIONS,
        classes=config["classes"],
        training={
            k: config["training"][k]
            for k in ("optimizer", "lr", "weight_decay", "epochs", "patience", "min_epochs",
                      "class_weights", "seed", "device")
        },
        # TensorBoard event files (config training.tensorboard): a log directory, not an output
        tensorboard=lambda wc: f"logs/tensorboard/{MODEL}/fold_{wc.fold}" if config["training"]["tensorboard"] else "",
    log:
        f"logs/train/{MODEL}/fold_{{fold}}.log",
    benchmark:
        f"benchmarks/train/{MODEL}/fold_{{fold}}.tsv"
    conda:
        "../../envs/training.yaml"
    script:
        "../../scripts/train.py"


rule summarize:
    input:
        predictions=expand(f"{OUT}/models/{MODEL}/fold_{{fold}}/predictions.csv", fold=FOLDS),
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
    params:
        classes=config["classes"],
        evaluation=config["evaluation"],
    log:
        f"logs/summarize/{MODEL}.log",
    benchmark:
        f"benchmarks/summarize/{MODEL}.tsv"
    conda:
        "../../envs/training.yaml"
    script:
        "../../scripts/summarize.py"
