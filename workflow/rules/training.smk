rule make_splits:
    input:
        samples=config["samples"],
    output:
        splits=f"{OUT}/splits/splits.csv",
    params:
        k=config["splits"]["k"],
        seed=config["splits"]["seed"],
        classes=config["classes"],
    log:
        "logs/make_splits.log",
    benchmark:
        "benchmarks/make_splits.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/make_splits.py"


rule train:
    input:
        splits=rules.make_splits.output.splits,
        features=feature_stores,
    output:
        model=f"{OUT}/models/{MODEL}/fold_{{fold}}/model.pt",
        history=f"{OUT}/models/{MODEL}/fold_{{fold}}/history.csv",
        predictions=f"{OUT}/models/{MODEL}/fold_{{fold}}/predictions.csv",
    params:
        fold=lambda wc: int(wc.fold),
        model=MODEL,
        model_kwargs=config["training"]["model_kwargs"],
        magnification=config["training"]["magnification"],
        classes=config["classes"],
        training={
            k: config["training"][k]
            for k in ("optimizer", "lr", "weight_decay", "epochs", "patience", "min_epochs",
                      "class_weights", "seed", "device")
        },
    log:
        f"logs/train/{MODEL}/fold_{{fold}}.log",
    benchmark:
        f"benchmarks/train/{MODEL}/fold_{{fold}}.tsv"
    conda:
        "../../envs/training.yaml"
    threads: config["training"]["threads"]
    resources:
        mem_mb=config["training"]["mem_mb"],
        runtime=240,
        gpu=config["training"]["gpu"],
    script:
        "../../scripts/train.py"


rule summarize:
    input:
        predictions=expand(f"{OUT}/models/{MODEL}/fold_{{fold}}/predictions.csv", fold=FOLDS),
    output:
        summary=f"{OUT}/summary/{MODEL}/summary.csv",
        predictions=f"{OUT}/summary/{MODEL}/predictions.csv",
        roc=f"{OUT}/summary/{MODEL}/roc.png",
        confusion=f"{OUT}/summary/{MODEL}/confusion.png",
    params:
        classes=config["classes"],
    log:
        f"logs/summarize/{MODEL}.log",
    benchmark:
        f"benchmarks/summarize/{MODEL}.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../../scripts/summarize.py"
