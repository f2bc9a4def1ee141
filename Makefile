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

.PHONY: test demo lint format install clean mutate

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

# Mutation testing of the maths modules with their fast tests (docs/testing.md); not part of
# `make test`. One worker, niced: the machine is shared. The globs name the mutated functions
# (all of the listed modules, and SkipCA's two functions in reward/modeling.py); keep them in step
# with tools/mutation_score.py.
MUTATE_TARGETS := "alignment.ddpo.*" "alignment.dpo.*" "alignment.draft.*" "alignment.flow.*" \
	"reward.losses.*" "reward.modeling.x_masked_skip_cross_attention__mutmut_*" \
	"reward.modeling.x*RewardHead*forward__mutmut_*"
mutate: $(STAMP)
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -e ".[dev,mutate]"
	rm -rf mutants
	OMP_NUM_THREADS=1 nice -n 10 $(VENV)/bin/mutmut run --max-children 1 $(MUTATE_TARGETS)
	$(PY) tools/mutation_score.py --min 90

demo: $(STAMP)
	$(PY) -m alignment.demo $(DEMO_ARGS)

clean:
	rm -rf outputs .pytest_cache
