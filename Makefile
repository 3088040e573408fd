# Everything the project needs is installed here: a clean clone needs only Python 3.10+ and git.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: venv demo test lint typecheck stress bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/doit run preprocess
	$(BIN)/hfbuild status

lint: $(STAMP)
	$(BIN)/ruff check hfbuild tests bench scripts dodo.py demo
	$(BIN)/ruff format --check hfbuild tests bench scripts dodo.py demo
	$(BIN)/mypy
	$(BIN)/actionlint docs/examples/hfbuild-ci.yml

test: lint
	$(BIN)/python -m pytest -n 2 -q

stress: $(STAMP)
	$(BIN)/python -m pytest -q -s -m stress --run-stress

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/bench_fingerprint.py
	$(BIN)/python bench/bench_pipeline.py --rows 300000
	$(BIN)/python bench/bench_pipeline.py --rows 2000
	$(BIN)/python bench/bench_observe.py
	$(BIN)/python bench/bench_envscan.py
	$(BIN)/python bench/bench_scale.py

clean:
	rm -rf $(VENV) .hfbuild .doit.db* .pytest_cache .mypy_cache .ruff_cache
