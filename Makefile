# Everything a fresh machine needs: `make demo` and `make test` install what they use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
export PRUNEKIT_DATA_DIR ?= $(SHARED)/data
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench-quality bench-speed clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU build of 2.13.0 (a bare `torch` would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $@

# Prune the embedded default model (SmolLM2-135M-Instruct) to 50% with Wanda, quick protocol.
demo: setup
	$(VENV)/bin/prunekit prune --model smollm2 --metric wanda --sparsity 0.5 \
	  --calib c4 --nsamples 32 --seqlen 512 --eval wikitext2 --max-windows 32 \
	  --out runs/demo-smollm2-wanda50 --overwrite
	$(VENV)/bin/prunekit verify --model runs/demo-smollm2-wanda50

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench-quality: setup
	$(PY) -m bench.quality

bench-speed: setup
	$(PY) -m bench.speed

clean:
	rm -rf runs .pytest_cache
