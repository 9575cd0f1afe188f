# Two commands do all the setup: `make run` (default recipe, offline, CPU) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint install clean wheelhouse mutants test-extras test-offline

# `make wheelhouse PY=3.12 PLATFORM=manylinux_2_28_x86_64`: finetune and every dependency a node
# with torch installed lacks, for that Python and platform (torch, CUDA, ROCm, Triton and what
# only torch needs left out). On the offline node:
#   pip install --no-index --find-links wheelhouse finetune
# EXTRAS="tensorboard gguf" adds those extras' dependencies (install 'finetune[tensorboard,gguf]').
# NODE_FREEZE=node-freeze.txt (the node's `python -m pip list --format=freeze`) leaves out what
# the node has within finetune's bounds.
WHEELHOUSE  ?= wheelhouse
EXTRAS      ?=
NODE_FREEZE ?=
PY          ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PLATFORM    ?= manylinux_2_28_$(shell uname -m)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 (a CPU build where a local wheel exists), else any release in range.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==2.13.0" || \
		$(BIN)/pip install "torch>=2.4,<=2.14.1"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/finetune run lora_sft

test: $(STAMP)
	$(BIN)/ruff check finetune recipes scripts tests
	$(BIN)/python -m pytest -q

# Mutation testing of the modules that carry the promises (docs/testing.md); not part of CI.
# `make mutants MUTANTS_ARGS="--module loss"` runs one module's mutants.
mutants: $(STAMP)
	$(BIN)/python scripts/mutants.py $(MUTANTS_ARGS)

# The optional paths CI skips (TRL, MLflow, DeepSpeed): installs those extras into the venv, then
# runs the tests that need them, printing why any still skips (docs/testing.md).
EXTRAS_TESTS := tests/unit/metrics/test_trackers.py tests/unit/scripts/test_bench_script.py \
	tests/unit/distributed/test_deepspeed.py tests/e2e/test_deepspeed.py tests/e2e/test_bench.py \
	tests/e2e/test_bench_own_model.py
test-extras: $(STAMP)
	$(BIN)/pip install -e ".[dev,bench,mlflow,deepspeed]"
	$(BIN)/python -m pytest -q -rs $(EXTRAS_TESTS)

# The offline-node install round trip (tests/e2e/test_wheelhouse.py): a fresh venv with torch and
# the Hugging Face stack (the node), a wheelhouse built from the index with its freeze, then
# installed there with no index; 5-10 minutes, not in CI.
test-offline: $(STAMP)
	FINETUNE_TEST_WHEELHOUSE=1 $(BIN)/python -m pytest -q -rs tests/e2e/test_wheelhouse.py

wheelhouse:
	$(PYTHON) scripts/wheelhouse.py --out $(WHEELHOUSE) --python-version $(PY) \
		$(foreach tag,$(PLATFORM),--platform $(tag)) $(foreach extra,$(EXTRAS),--extra $(extra)) \
		$(if $(NODE_FREEZE),--node-has $(NODE_FREEZE))

lint: $(STAMP)
	$(BIN)/ruff check finetune recipes scripts tests

clean:
	rm -rf $(VENV) build dist *.egg-info
