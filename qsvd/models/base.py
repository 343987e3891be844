"""The base model a lean checkpoint refers to: which tensors it still shares, and the identity of its weight files.

A compressed checkpoint stores only what compression changed. `track_base` records, right after a model is
loaded, which tensor object sits at every state-dict name (and its in-place version counter); at save time
`changed_tensors` returns the entries that are no longer that object or were modified in place. The base is
named by its source and a content hash (SHA-256 and size of each weight file), checked again on reload.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qsvd.artefacts import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_BASE_ATTRIBUTE = "_qsvd_base"


class BaseModelMismatch(RuntimeError):
    """The base model a lean checkpoint was made from is missing or has other weights now."""


def _identity(tensor: torch.Tensor) -> tuple[int, int, int]:
    return id(tensor), tensor.data_ptr(), tensor._version


def track_base(model: nn.Module, source: str | Path, reference: dict | None = None) -> None:
    """Remember that every current state-dict tensor of `model` comes from the base model at `source`
    (`reference`: that base's identity, when already known, e.g. from a lean checkpoint's manifest)."""
    tensors = {name: _identity(t) for name, t in model.state_dict(keep_vars=True).items() if t is not None}
    object.__setattr__(model, _BASE_ATTRIBUTE, {"source": str(source), "reference": reference, "tensors": tensors})


def untrack_base(model: nn.Module, names) -> None:
    """Tensors at `names` no longer count as the base's (e.g. they were loaded from a checkpoint's own file)."""
    record = getattr(model, _BASE_ATTRIBUTE, None)
    if record is not None:
        for name in names:
            record["tensors"].pop(name, None)


def base_record(model: nn.Module) -> dict | None:
    return getattr(model, _BASE_ATTRIBUTE, None)


def changed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of `model` that are not (or no longer) the base model's tensors."""
    record = base_record(model)
    state = {name: t for name, t in model.state_dict(keep_vars=True).items() if t is not None}
    if record is None:
        return state
    return {name: t for name, t in state.items() if record["tensors"].get(name) != _identity(t)}


def weight_files(source: str | Path) -> list[Path]:
    """The weight files of a local model directory or of a hub id's locally cached snapshot."""
    path = Path(str(source)).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(source), local_files_only=True))
        except Exception as error:  # the hub client raises several types; all mean "not cached here"
            raise BaseModelMismatch(f"base model {source!r} is neither a local directory nor in the hub cache ({error})") from error
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise BaseModelMismatch(f"base model directory {path} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return files


def base_identity(source: str | Path) -> dict:
    """{"source", "files": {name: {"bytes", "sha256"}}} of the base model's weight files."""
    return {
        "source": str(source),
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in weight_files(source)},
    }


def verify_base(reference: dict, checkpoint: Path) -> None:
    """Raise, naming the file and the fix, unless the base's weight files are still the ones recorded."""
    rebuild = (
        f"restore the base model at {reference['source']!r} (the one {checkpoint} was compressed from), or rebuild "
        f"{checkpoint} from the current base (snakemake --forcerun <rule>, or the qsvd stage that wrote it)"
    )
    try:
        current = base_identity(reference["source"])
    except BaseModelMismatch as error:
        raise BaseModelMismatch(f"{checkpoint} needs its base model: {error}; {rebuild}") from None
    if current["files"] != reference["files"]:
        changed = sorted(set(current["files"]) ^ set(reference["files"])) or [
            name for name in reference["files"] if current["files"].get(name) != reference["files"][name]
        ]
        raise BaseModelMismatch(f"{checkpoint}: the base model's weight files changed since it was made ({changed[:3]}); {rebuild}")
