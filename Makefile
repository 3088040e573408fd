# Everything the project needs is installed here: a clean clone needs only Python 3.10+ and git.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: venv demo test lint typecheck stress fuzz bench clean install-check

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

# hfbuild's own modules compiled first: an editable install leaves them uncompiled, and where
# PYTHONDONTWRITEBYTECODE is set each process of the suite importing hfbuild (every doit,
# hfbuild and python -c run) compiled them again (up to 0.17 s of CPU). Python checks each
# cache against its source's mtime and size, as for any module.
test: lint
	$(BIN)/python -m compileall -q hfbuild
	$(BIN)/python -m pytest -n 3 -q --durations=30

# The extras as a user installs them: the built wheel into a fresh venv, `hfbuild[ray,s3]`
# resolved by that venv's own pip (a dry run: resolving is what failed, and a real install
# downloads Ray and Arrow). Bounded: a resolver backtracking through old releases fails here.
install-check:
	rm -rf build/install-check
	$(PYTHON) -m venv build/install-check/venv
	build/install-check/venv/bin/pip wheel --quiet --no-deps -w build/install-check .
	timeout 240 build/install-check/venv/bin/pip install --dry-run --quiet \
		"hfbuild[ray,s3] @ file://$(CURDIR)/$$(ls build/install-check/hfbuild-*.whl)"

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
