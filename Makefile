# Two commands a fresh machine needs: `make demo` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU torch wheel lies in /opt/wheels on these machines; pip finds it by version.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.installed

.PHONY: demo ablation test test-all lint format clean install

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) torch==2.13.0
	$(PIP) install -q $(FIND_LINKS) -c constraints.txt -e '.[dev]'
	@$(PY) -c "import importlib.util as u, sys; sys.exit('the PyPI package apex must not be installed' if u.find_spec('apex') else 0)"
	@$(PY) -c "import torch; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m megatron_mopd demo

ablation: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m megatron_mopd ablation

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_mopd patches tools tests examples
	$(VENV)/bin/ruff format --check megatron_mopd patches tools tests examples

format: $(STAMP)
	$(VENV)/bin/ruff format megatron_mopd patches tools tests examples
	$(VENV)/bin/ruff check --fix megatron_mopd patches tools tests examples

clean:
	rm -rf $(VENV) runs .pytest_cache
