# Two commands a fresh machine needs: `make demo` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU torch wheel lies in /opt/wheels on these machines; pip finds it by version.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.installed
# real SGLang 0.5.23 for CPU, in an environment of its own (tools/install_sglang_cpu.sh)
SGLANG_VENV := .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.installed
SGLANG_INPUTS := tools/install_sglang_cpu.sh $(wildcard patches/sglang_cpu/*.txt patches/sglang_cpu/*.in patches/sglang_cpu/*.py patches/sglang_cpu/sgl_kernel/*.py)

.PHONY: demo demo-sglang ablation test test-all lint format clean install sglang trl bench-trl

install: $(STAMP)

sglang: $(SGLANG_STAMP)

# TRL 1.16 for tools/bench_vs_trl.py, in an environment of its own (never in make test)
TRL_VENV := .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed

trl: $(TRL_STAMP)

$(TRL_STAMP): tools/trl/requirements.txt
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q $(FIND_LINKS) torch==2.13.0
	$(TRL_VENV)/bin/pip install -q $(FIND_LINKS) -r tools/trl/requirements.txt
	@$(TRL_VENV)/bin/python -c "import torch; assert '+cpu' in torch.__version__, torch.__version__"
	touch $(TRL_STAMP)

bench-trl: $(STAMP) $(TRL_STAMP)
	$(PY) tools/bench_vs_trl.py

$(SGLANG_STAMP): $(SGLANG_INPUTS)
	bash tools/install_sglang_cpu.sh $(SGLANG_VENV)

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) torch==2.13.0
	$(PIP) install -q $(FIND_LINKS) -c constraints.txt -e '.[dev]'
	@$(PY) -c "import importlib.util as u, sys; sys.exit('the PyPI package apex must not be installed' if u.find_spec('apex') else 0)"
	@$(PY) -c "import torch; assert '+cpu' in torch.__version__ or torch.cuda.is_available(), torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m megatron_mopd demo

# the same run with the rollout engine and both teachers on real SGLang servers
demo-sglang: $(STAMP) $(SGLANG_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m megatron_mopd demo --sglang --run-dir runs/demo-sglang

ablation: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m megatron_mopd ablation

# the SGLang tests need the real server: MOPD_REQUIRE_SGLANG turns their skip into a failure
test: $(STAMP) $(SGLANG_STAMP)
	MOPD_REQUIRE_SGLANG=1 $(PY) -m pytest -q

test-all: $(STAMP) $(SGLANG_STAMP)
	MOPD_REQUIRE_SGLANG=1 $(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_mopd patches tools tests examples
	$(VENV)/bin/ruff format --check megatron_mopd patches tools tests examples

format: $(STAMP)
	$(VENV)/bin/ruff format megatron_mopd patches tools tests examples
	$(VENV)/bin/ruff check --fix megatron_mopd patches tools tests examples

clean:
	rm -rf $(VENV) $(SGLANG_VENV) $(TRL_VENV) runs .pytest_cache
