# slidesnake: `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= all
DEMO   ?= resources/demo

.PHONY: demo demo-data test lint dry-run report clean help

help:
	@echo "make demo   - create $(VENV), generate the demo cohort, run the whole pipeline on it"
	@echo "make test   - create $(VENV) with test extras and run the test suite"
	@echo "make lint   - snakemake --lint on the demo configuration"

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

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: demo-data
	$(BIN)/snakemake --configfile config/demo.yaml --lint

dry-run: demo-data
	$(BIN)/snakemake --configfile config/demo.yaml -n

report: $(BIN)/.installed
	$(BIN)/snakemake --configfile config/demo.yaml --report report.html

clean:
	rm -rf results logs benchmarks .snakemake report.html
