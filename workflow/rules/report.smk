rule run_summary:
    input:
        samples=config["samples"],
        tissue=cohort_files(rules.filter_tissue.output.tiles),
        excluded=rules.excluded_table.output.table,
        # one list per stage, in pipeline order: the script reads every input named bench_<stage>
        bench_tile=cohort_files(rules.tile.benchmark),
        bench_filter_tissue=cohort_files(rules.filter_tissue.benchmark),
        bench_qc_table=rules.qc_table.benchmark,
        bench_extract_features=cohort_files(rules.extract_features.benchmark),
        bench_excluded_table=rules.excluded_table.benchmark,
        bench_make_splits=rules.make_splits.benchmark,
        bench_train=expand(rules.train.benchmark, fold=FOLDS),
        bench_summarize=rules.summarize.benchmark,
        bench_heatmap=cohort_files(rules.heatmap.benchmark),
    output:
        slides=report(
            f"{OUT}/run_summary/slides.tsv",
            caption="../report/run_slides.rst",
            category="Run summary",
        ),
        stages=report(
            f"{OUT}/run_summary/stages.tsv",
            caption="../report/run_stages.rst",
            category="Run summary",
        ),
    log:
        f"{OUT}/logs/run_summary.log",
    benchmark:
        f"{OUT}/benchmarks/run_summary.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        magnification=config["training"]["magnification"],
    script:
        "../../scripts/run_summary.py"
