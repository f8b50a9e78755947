# Two commands on a fresh machine: `make serve` runs the gateway, `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on disk here; a plain `pip install torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: serve test lint pytest unit install bench faults clean

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
	$(BIN)/bandit -c pyproject.toml -r service worker -q

# tests/peers.sh provides the peers first (Debian packages, the venv, a private Redis/PostgreSQL when none
# answers, the pinned OHIF build), prints one line per peer, then runs lint and pytest against them.
# Extra pytest arguments: make test PYTEST_ARGS='-k dashboard'.
# (SUBMAKE, not $(MAKE), in the recipe: `make -n test` must not install packages or start servers.)
SUBMAKE := $(MAKE) --no-print-directory
test:
	@MAKE='$(SUBMAKE)' VENV='$(VENV)' PYTHON='$(PYTHON)' tests/peers.sh $(SUBMAKE) lint pytest

# pytest alone, against whatever peers answer (`make test` provides them), under coverage of service/ and
# worker/ (pyproject.toml [tool.coverage.*]; the gateway's own processes too). It ends with one line of
# totals; per file: build/coverage/report.txt, html/index.html, coverage.xml. A total under fail_under fails
# the run, unless the run is partial on purpose (PYTEST_ARGS given, or no ../shared: its tests skip).
COVERAGE := $(BIN)/python -m coverage
COV_GATE := $(if $(strip $(PYTEST_ARGS))$(if $(wildcard ../shared),,absent),--fail-under=0,)
pytest: $(VENV)/.installed
	@rm -rf build/coverage
	@status=0; $(COVERAGE) run -m pytest $(PYTEST_ARGS) || status=$$?; \
	$(COVERAGE) combine --quiet || exit $$(( status ? status : 1 )); \
	$(COVERAGE) report --fail-under=0 >build/coverage/report.txt; \
	$(COVERAGE) html --quiet --fail-under=0; $(COVERAGE) xml --quiet --fail-under=0; \
	pkgs=; for pkg in service worker; do \
	  pkgs="$$pkgs $$pkg $$($(COVERAGE) report --include="$$pkg/*" --format=total --fail-under=0)%"; \
	done; \
	gate=$$($(COVERAGE) report --format=total $(COV_GATE)) \
	  || { status=$$(( status ? status : 2 )); echo "$$gate" | sed -n 's/^Coverage failure: //p'; }; \
	echo "coverage:$$pkgs, total $$($(COVERAGE) report --format=total --fail-under=0)%" \
	  "(statements and branches; per file: build/coverage/report.txt)"; \
	exit $$status

# Orthanc (DICOMweb) + OHIF + the gateway on this machine, the shared chest studies sent, links printed;
# Ctrl-C stops it all. See deploy/demo/run_demo.sh (ports, DEMO_STUDIES).
.PHONY: demo
demo: $(VENV)/.installed
	VENV='$(VENV)' deploy/demo/run_demo.sh

# The standing fault suite (tests/faults): faults that come together on the deployed set-up, each with
# its recovery time (docs/benchmarks.md). Minutes; not part of `make test`.
faults: $(VENV)/.installed
	@MAKE='$(SUBMAKE)' VENV='$(VENV)' PYTHON='$(PYTHON)' tests/peers.sh $(BIN)/python -m pytest -m faults tests/faults -s $(PYTEST_ARGS)

# The quick benchmarks (minutes); ingest_bench.py and load_fault.py take longer: see docs/benchmarks.md.
bench: $(VENV)/.installed
	$(BIN)/python bench/inference_bench.py
	$(BIN)/python bench/heatmap_bench.py
	$(BIN)/python bench/batching_bench.py

clean:
	rm -rf $(VENV) .cxr-data
