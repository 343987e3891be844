"""qsvd: joint QKV low-rank and low-precision compression of vision-language models."""

__version__ = "0.1.0"

from qsvd.models import hf_door as _hf_door  # noqa: E402,F401  registers quant_method "qsvd" with transformers


def from_pretrained(path, device="cpu", dtype=None, cache_mode="latent", integer=True):
    """A compressed model saved by qsvd, with its latent KV cache (see qsvd.models.checkpoint.from_pretrained)."""
    from qsvd.models.checkpoint import from_pretrained as load

    return load(path, device=device, dtype=dtype, cache_mode=cache_mode, integer=integer)
