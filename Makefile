# `make demo` and `make test` do all the set-up on a fresh machine: a virtual environment in .venv,
# torch, then the project with its test extra. Set PYTHON=... to choose the interpreter (3.11+).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Tests and the demo never touch the network.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow bench gpu-check docs clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m pipeline demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) -m pipeline.benchmarks.rnn
	$(PY) -m pipeline.benchmarks.decode
	$(PY) -m pipeline.benchmarks.extract

# The GPU checks and benchmarks in one run (pytest -m gpu, then EleAttLSTM/GRU vs cuDNN, resnet50 extraction, end-to-end
# training, RAFT; under 8 minutes on one GPU) -> build/gpu-check/gpu_check.json and .md. Without a CUDA device a dry
# run: the same tests on the CPU and the benchmarks at tiny sizes, which says so (CI runs it: nothing can rot).
gpu-check: install
	$(PY) -m pipeline.benchmarks.gpu_check --out build/gpu-check

# The documentation (docs/, mkdocs.yml) as a site in build/docs, with the docs extra installed if needed; strict: a
# broken link, anchor or page fails.
docs: install
	$(PY) -c 'import sys, mkdocs; sys.exit(tuple(map(int, mkdocs.__version__.split(".")[:2])) < (1, 6))' 2>/dev/null \
	  || $(PY) -m pip install --quiet --disable-pip-version-check -e '.[docs]'
	$(PY) -m mkdocs build --strict --site-dir build/docs

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
