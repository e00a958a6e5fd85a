# Optional hyperparameter search (config `tuning`); not part of `rule all`. Ask for it by target:
#   snakemake results/tuning/clam/best_params.yaml
# best_params.yaml is a config fragment (training.model, lr, weight_decay, model_kwargs); train with
# it by giving it as the last config file: snakemake --configfile my.yaml results/tuning/clam/best_params.yaml


rule tune:
    input:
        splits=rules.make_splits.output.splits,
        features=feature_stores,
        # patient and stain of every slide (case bags of hierarchical models)
        samples=config["samples"],
    output:
        best=f"{OUT}/tuning/{{model}}/best_params.yaml",
        study=f"{OUT}/tuning/{{model}}/study.csv",
    log:
        f"{OUT}/logs/tune/{{model}}.log",
    benchmark:
        f"{OUT}/benchmarks/tune/{{model}}.tsv"
    wildcard_constraints:
        model="[A-Za-z0-9_]+",
    conda:
        "../../envs/training.yaml"
    params:
        model=lambda wc: wc.model,
        # the configured model_kwargs are the fixed base of the search for the configured model only
        model_kwargs=lambda wc: config["training"]["model_kwargs"] if wc.model == MODEL else {},
        magnification=config["training"]["magnification"],
        magnifications=TRAIN_MAGNIFICATIONS,
        classes=config["classes"],
        training={
            k: config["training"][k]
            for k in ("optimizer", "epochs", "patience", "min_epochs", "class_weights", "seed")
        },
        tuning=config["tuning"],
    script:
        "../../scripts/tune.py"
