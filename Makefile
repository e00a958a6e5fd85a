# slidesnake: `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= all
DEMO   ?= resources/demo
DEMO_MULTISTAIN ?= resources/demo_multistain
DEMO_PREDICT ?= resources/demo_predict
DEMO_COUPLED ?= resources/demo_coupled
XDG_CONFIG_HOME ?= $(HOME)/.config

.PHONY: demo demo-data test test-fast lint dry-run report clean help slurm-profile demo-cma demo-multistain demo-multistain-data predict-demo predict-demo-data demo-coupled demo-coupled-data bench-features bench-tiling bench-dag bench-encoders

help:
	@echo "make demo   - create $(VENV), generate the demo cohort, run the whole pipeline on it"
	@echo "make demo-cma        - the demo cohort with cma_mil at 5x/10x/20x (results/demo_cma)"
	@echo "make demo-multistain - a multi-stain (HE + IHC) demo cohort with hier_multistain (results/demo_multistain)"
	@echo "make demo-coupled - coupled embedder / bag training (ICMIL, 2 rounds) on a harder demo cohort (results/demo_coupled)"
	@echo "make predict-demo - after make demo: its fold models predict new demo slides (results/predict/demo_new)"
	@echo "make test   - create $(VENV) with test extras and run the whole test suite (CI)"
	@echo "make test-fast - unit tests and the one shared small end-to-end run (pytest -m 'not slow'), for the edit-test loop"
	@echo "make lint   - snakemake --lint on the demo configuration"
	@echo "make bench-features - feature extraction vs the backbone alone and a naive loader (BENCH_ARGS='--size 8000' for a quick run)"
	@echo "make bench-tiling - tiling + tissue filtering of a 100k x 100k px slide: time, tiles/s, peak memory"
	@echo "make bench-dag - time of snakemake -n (DAG building) for 500, 1000 and 5000 placeholder slides"
	@echo "make bench-encoders - tiles/s and parameters of every foundation-model preset at full size (random weights)"
	@echo "make slurm-profile - link workflow/profiles/slurm to $(XDG_CONFIG_HOME)/snakemake/slurm (--profile slurm)"

# The environment: re-installed when pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo-data: $(BIN)/.installed
	$(BIN)/python -m slidesnake.demo --out $(DEMO)

demo: demo-data
	$(BIN)/snakemake --configfile config/demo.yaml --cores $(CORES)

demo-cma: demo-data
	$(BIN)/snakemake --configfile config/demo.yaml config/demo_cma.yaml --cores $(CORES)

demo-multistain-data: $(BIN)/.installed
	$(BIN)/python -m slidesnake.demo --out $(DEMO_MULTISTAIN) --stains HE IHC --size 3000

demo-multistain: demo-multistain-data
	$(BIN)/snakemake --configfile config/demo.yaml config/demo_multistain.yaml --cores $(CORES)

# A harder cohort (small, subtle tumours) for coupled training (training.coupling, docs/models.md).
demo-coupled-data: $(BIN)/.installed
	$(BIN)/python -m slidesnake.demo --out $(DEMO_COUPLED) --patients 16 --size 3000 --seed 7 \
	  --tumour-fraction 0.03 0.08 --tumour-contrast 0.35

demo-coupled: demo-coupled-data
	$(BIN)/snakemake --configfile config/demo.yaml config/demo_coupled.yaml --cores $(CORES)

# New slides (another seed, ids NEW-...) predicted by the demo's trained fold models: the `predict`
# target (config/predict_demo.yaml), after the demo run it depends on.
predict-demo-data: $(BIN)/.installed
	$(BIN)/python -m slidesnake.demo --out $(DEMO_PREDICT) --patients 4 --seed 101 --predict-sheet NEW-

predict-demo: demo predict-demo-data
	$(BIN)/snakemake --configfile config/demo.yaml config/predict_demo.yaml --cores $(CORES) predict

# The whole suite (CI: .ci/run adds PYTEST_ARGS=--durations=30), and its fast tier: everything but
# the tests marked slow (further end-to-end runs, digit-bag benchmarks; see pyproject's markers).
PYTEST_ARGS ?=
test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

# Feature extraction benchmark (docs/benchmarks.md): builds a 60k x 60k synthetic slide once under
# results/bench/, runs on CUDA when present, else CPU. E.g. BENCH_ARGS='--backbone resnet18_trunc --repeats 3'.
BENCH_ARGS ?=
bench-features: $(BIN)/.installed
	$(BIN)/python scripts/bench/bench_features.py $(BENCH_ARGS)

# Tiling + tissue filtering benchmark (docs/benchmarks.md): writes a 100k x 100k px slide once
# (about 1.6 GB, a few minutes) under /tmp/slidesnake-bench, then runs rules tile and filter_tissue
# under /usr/bin/time -v. E.g. BENCH_TILING_ARGS='--size 20000 --cores 4'.
bench-tiling: $(BIN)/.installed
	$(BIN)/python scripts/bench/bench_tiling.py $(BENCH_TILING_ARGS)

# DAG building benchmark (docs/benchmarks.md): snakemake -n on sheets of placeholder slides.
bench-dag: $(BIN)/.installed
	$(BIN)/python scripts/bench/bench_dag.py $(BENCH_DAG_ARGS)

# Foundation-model presets at full size, random weights: tiles/s and parameters (docs/benchmarks.md).
# E.g. BENCH_ENCODERS_ARGS='--presets uni ctranspath --batch-size 8'.
bench-encoders: $(BIN)/.installed
	PYTHONPATH=scripts $(BIN)/python scripts/bench/bench_encoders.py $(BENCH_ENCODERS_ARGS)

lint: demo-data
	$(BIN)/snakemake --configfile config/demo.yaml --lint

dry-run: demo-data
	$(BIN)/snakemake --configfile config/demo.yaml -n

report: $(BIN)/.installed
	$(BIN)/snakemake --configfile config/demo.yaml --report report.html

# `snakemake --profile slurm` looks in ./slurm, $XDG_CONFIG_HOME/snakemake/slurm and /etc/xdg/snakemake/slurm.
slurm-profile:
	@mkdir -p $(XDG_CONFIG_HOME)/snakemake
	@if [ -e $(XDG_CONFIG_HOME)/snakemake/slurm ] && [ ! -L $(XDG_CONFIG_HOME)/snakemake/slurm ]; then \
	  echo "$(XDG_CONFIG_HOME)/snakemake/slurm exists and is not a link; move it away first" >&2; exit 1; fi
	ln -sfn $(CURDIR)/workflow/profiles/slurm $(XDG_CONFIG_HOME)/snakemake/slurm

clean:
	rm -rf results logs benchmarks .snakemake report.html
