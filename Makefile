# `make test` and `make demo` set everything up on a fresh machine.
# torch is installed first, pinned, so that nothing later pulls another build. PyPI's Linux torch is the multi-GB
# CUDA build: for the CPU build, `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` (on our machines
# pip finds the CPU wheel without it). On a GPU machine, install the torch you want into .venv first: it is kept.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install test docs demo gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(MAKE) --no-print-directory docs
	$(PY) -m pytest -q

# the docs site, built offline into a temporary folder: a broken link, page or API reference fails the build
docs: install
	site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $$site; \
	status=$$?; rm -rf "$$site"; exit $$status

demo: install
	$(PY) scripts/demo.py

# on a GPU machine, with the torch, triton and transformers there: no install step (see scripts/gpu_check.py)
gpu-check:
	$(PYTHON) scripts/gpu_check.py --out gpu-check

clean:
	rm -rf $(VENV) outputs gpu-check
