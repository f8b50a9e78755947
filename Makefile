# Two commands on a fresh machine: `make serve` runs the gateway, `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on disk here; a plain `pip install torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: serve test lint unit install bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(FIND_LINKS) "$(TORCH)"
	$(BIN)/pip install --quiet $(FIND_LINKS) -e ".[test]"
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/cxr-gateway serve

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# The quick benchmarks (minutes); ingest_bench.py and load_fault.py take longer: see docs/benchmarks.md.
bench: $(VENV)/.installed
	$(BIN)/python bench/inference_bench.py
	$(BIN)/python bench/heatmap_bench.py
	$(BIN)/python bench/batching_bench.py

clean:
	rm -rf $(VENV) .cxr-data
