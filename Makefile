# Two commands do all the setup: `make run` (default recipe, offline, CPU) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint install clean wheelhouse

# `make wheelhouse PY=3.12 PLATFORM=manylinux_2_28_x86_64`: finetune and every dependency a node
# with torch installed lacks, for that Python and platform (torch, CUDA, ROCm, Triton left out).
# On the offline node: pip install --no-index --find-links wheelhouse finetune
WHEELHOUSE ?= wheelhouse
PY         ?= $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PLATFORM   ?= manylinux_2_28_$(shell uname -m)

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

wheelhouse:
	$(PYTHON) scripts/wheelhouse.py --out $(WHEELHOUSE) --python-version $(PY) \
		$(foreach tag,$(PLATFORM),--platform $(tag))

lint: $(STAMP)
	$(BIN)/ruff check finetune recipes scripts tests

clean:
	rm -rf $(VENV) build dist *.egg-info
