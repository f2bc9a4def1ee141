# One entry point. `make test` and `make demo` set themselves up on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HOME := $(CURDIR)/.cache/huggingface
export MPLBACKEND := Agg

.PHONY: test demo lint format install clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, and the CPU build when no torch is importable: a plain `pip install torch` (or a
# dependency that asks for it) would otherwise pull a multi-GB CUDA build.
# constraints.txt pins the versions CI tested (the ranges stay in pyproject.toml).
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@# DeepSpeed compiles its CPU shared-memory comm op on first use (~1-2 min): do it once here
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || true
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# two pytest workers on a 2-core machine: one thread each (more threads oversubscribe the cores)
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) -m alignment.demo $(DEMO_ARGS)

clean:
	rm -rf outputs .pytest_cache
