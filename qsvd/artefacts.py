"""The one door for stage outputs: safetensors tensors + a JSON manifest, written atomically."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import qsvd

MANIFEST = "manifest.json"


def provenance(stage: str, config: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """What produced an artefact: stage, its resolved config, seed and software versions."""
    import transformers

    return {
        "stage": stage,
        "config": config,
        "seed": seed,
        "qsvd_version": qsvd.__version__,
        "git_revision": _git_revision(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
    }


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `out_dir`, on error it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` then rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")

    atomic_write(Path(path), write)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the stage that produces it first")
    return json.loads(path.read_text())


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically (contiguous, CPU)."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the stage that produces it first")
    return load_file(str(path))


def write_artefact(
    directory: str | Path,
    tensors: dict[str, torch.Tensor] | None,
    manifest: dict[str, Any],
    tensors_name: str = "tensors.safetensors",
) -> Path:
    """Write a stage's tensors and its manifest into `directory`; the manifest is written last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        write_tensors(directory / tensors_name, tensors)
        manifest = {**manifest, "tensors": tensors_name}
    write_json(directory / MANIFEST, manifest)
    return directory


def read_artefact(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read back what `write_artefact` wrote."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST)
    tensors = read_tensors(directory / manifest["tensors"]) if "tensors" in manifest else {}
    return tensors, manifest
