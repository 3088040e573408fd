# Everything the project needs is installed here: a clean clone needs only Python 3.10+ and git.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: venv demo test lint typecheck stress fuzz bench clean

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

# The differential test against plain datasets with every dimension and thousands of examples
# (tests/test_differential.py). Replay a failure with the seed it names:
# `make fuzz HFBUILD_FUZZ_SEED=<seed>`; HFBUILD_FUZZ_EXAMPLES sets the number of examples,
# HFBUILD_DIFF_DIMS the dimensions (comma-separated, `all` for every one).
ifeq ($(HFBUILD_FUZZ_SEED),)
HFBUILD_FUZZ_SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
fuzz: $(STAMP)
	@echo "differential fuzz: HFBUILD_FUZZ_SEED=$(HFBUILD_FUZZ_SEED)"
	HFBUILD_FUZZ=1 HFBUILD_FUZZ_SEED=$(HFBUILD_FUZZ_SEED) \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_differential.py

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
