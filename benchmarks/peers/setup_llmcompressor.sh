#!/usr/bin/env bash
# The llm-compressor peer's own virtual environment (.venv-llmcompressor, git-ignored): llmcompressor 0.14.0.1
# needs transformers <= 5.17, older than qsvd's, so it cannot share qsvd's venv. torch is held at the
# version of qsvd's venv by a constraint (an unpinned torch pulls a 5.5 GB CUDA build). qsvd itself is
# installed without its dependencies: the peer script uses only its data, prompt, perplexity and artefact code.
#
#   bash benchmarks/peers/setup_llmcompressor.sh [VENV_DIR]      (default: .venv-llmcompressor)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-.venv-llmcompressor}"
python="${PYTHON:-python3}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet -c "$constraints" -r envs/llmcompressor-requirements.txt
"$venv/bin/pip" install --quiet --no-deps -e .
"$venv/bin/python" - <<'PY'
import llmcompressor, compressed_tensors, torch, transformers
import qsvd.evaluation.perplexity  # noqa: F401  qsvd's own scoring imports here
print(f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
PY
