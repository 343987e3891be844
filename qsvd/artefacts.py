"""The one door for stage outputs: safetensors tensors + a JSON manifest, written atomically and checked on read.

Integrity. A directory artefact's `manifest.json` records, under "files", the size and SHA-256 of every other file
of its directory (`atomic_directory` adds them when the directory is complete); a JSON artefact written by
`write_json` (a rank plan, an evaluation result, a manifest) embeds "content_sha256", the digest of its own content
in canonical form, and may record the files it describes beside it (an evaluation's predictions) under "files" too.
`read_json` (hence `read_artefact` and every manifest reader) checks both before the data is used: sizes on every
read, each file's SHA-256 once per process and file version (memoised by path, size and mtime, like the base model's
weight files: a 13 GB file costs one sequential read, about 10 s, in the first process that reads it, nothing on
later reads in that process). A mismatch, an unreadable file or a file missing inside an output that exists raises
`DamagedArtefact`, naming the damaged path and the command that rebuilds it (`snakemake --forcerun <rule>`, or the
`qsvd` stage). Files written before qsvd recorded digests carry none and are read unchecked.

Interrupted writes. Directories are filled under a temporary sibling `.<name>.tmp-*` and renamed into place; single
files likewise. A kill leaves only such siblings, never a half-written final name; the next writer of that output
removes the ones older than its own process (`clean_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import qsvd

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DIGEST = "content_sha256"  # a JSON artefact's digest of its own content (canonical form, this key left out)
FILES = "files"  # {relative path: {"bytes", "sha256"}} of the files an artefact's JSON describes
TEMPORARY = ".tmp-"  # `.<name>.tmp-*`: a writer's temporary sibling of <name>
_PROCESS_START = time.time()  # temporaries older than this belong to an earlier, interrupted process
_HASH_CACHE: dict[tuple[str, int, int], str] = {}

# manifest "stage" -> (Snakemake rule that writes that kind of artefact in workflow/rules/*.smk, `qsvd` subcommand);
# tests/test_artefacts.py ties both to the workflow and the command line.
REBUILDS: dict[str, tuple[str | None, str]] = {
    "data": ("materialise_dataset", "data"),
    "demo_model": ("demo_model", "demo-model"),
    "export_smollm2": ("smollm2_model", "export-smollm2"),
    "smolvlm_offline_model": ("smolvlm_offline_model", "smolvlm-offline-model"),
    "random_model": ("random_model", "random-model"),
    "activation_stats": ("activation_stats", "stats"),
    "input_gram": ("input_gram", "stats --gram"),  # activation_stats with gram: its own rule and directory
    "decompose": ("decompose", "decompose"),
    "importance": ("importance", "importance"),
    "rank_plan": ("rank_plan", "rank-plan"),
    "lowrank_model": ("lowrank_model", "lowrank-model"),
    "quantize": ("quantize", "quantize"),
    "evaluate": ("evaluate", "evaluate"),
    "export": (None, "export"),  # `qsvd export` has no rule
    "paper_table": ("paper_table", "paper-table"),
    "smolvlm_offline_language_model": ("smolvlm_offline_language_model", "export-smollm2"),
}
# Where a damaged JSON no longer says its stage: the kind by the output's name in the workflow's layout.
_KIND_BY_NAME = {"stats": "activation_stats", "gram": "input_gram", "decomposition": "decompose",
                 "importance": "importance", "plan.json": "rank_plan", "language_model": "smolvlm_offline_language_model"}


class DamagedArtefact(RuntimeError):
    """A stage output whose files are missing, truncated or changed since it was written."""

    def __init__(self, artefact: Path, problems: list[str], rebuild: str) -> None:
        self.artefact, self.problems, self.rebuild = Path(artefact), problems, rebuild
        super().__init__(f"damaged artefact {artefact}: {'; '.join(problems)}. Rebuild it: {rebuild}")


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


# --- digests -------------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, computed once per process for each (path, size, mtime)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def file_records(directory: str | Path, names: list[str] | None = None) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of `names` in `directory` (default: every file below it but the manifest)."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
        names = [n for n in names if n != MANIFEST]
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)} for name in names}


def _canonical_digest(data: dict) -> str:
    text = json.dumps({k: v for k, v in data.items() if k != DIGEST}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_files(directory: Path, files: dict[str, dict], artefact: Path, manifest: dict | None) -> None:
    """Raise `DamagedArtefact` unless every recorded file below `directory` has its recorded size and SHA-256."""
    problems = []
    for name, record in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {record['bytes']} were written")
    for name, record in files.items():
        if not problems and file_sha256(directory / name) != record["sha256"]:
            problems.append(f"{directory / name} differs from what was written (SHA-256)")
    if problems:
        raise DamagedArtefact(artefact, problems, rebuild_command(artefact, manifest))


# --- what rebuilds an artefact ------------------------------------------------------------------------------------


def artefact_kind(artefact: Path, manifest: dict | None) -> str | None:
    """The REBUILDS key of an artefact: from its manifest's stage, else from its name in the workflow's layout."""
    artefact = Path(artefact)
    stage = (manifest or {}).get("stage")
    if (manifest or {}).get("format") == "transformers":  # an export (qsvd.models.hf_door)
        return "export"
    if stage == "activation_stats" and ((manifest or {}).get("config") or {}).get("gram"):
        return "input_gram"
    if stage == "export_smollm2" and artefact.name == "language_model":
        return "smolvlm_offline_language_model"
    if stage in REBUILDS:
        return stage
    if artefact.name in _KIND_BY_NAME:
        return _KIND_BY_NAME[artefact.name]
    if artefact.parent.name == "eval" and artefact.suffix == ".json":
        return "evaluate"
    if artefact.name == "model" and any(part.startswith("quant~") for part in artefact.parts):
        return "quantize"
    if artefact.name == "model" and any(part.startswith("rank~") for part in artefact.parts):
        return "lowrank_model"
    if artefact.parent.name == "data":
        return "data"
    return None


def rebuild_command(artefact: Path, manifest: dict | None = None) -> str:
    """How to rebuild `artefact`: `snakemake --forcerun <rule>` and the `qsvd` stage that writes it."""
    kind = artefact_kind(artefact, manifest)
    if kind is None:
        return f"snakemake --force {artefact} (or rerun the qsvd stage that wrote it)"
    rule, command = REBUILDS[kind]
    if kind == "export":
        source = (manifest or {}).get("exported_from", "<checkpoint>")
        return f"qsvd export --model {source} --out {artefact}"
    return f"snakemake --forcerun {rule} (or delete {artefact} and rerun `qsvd {command} ... --out {artefact}`)"


def _enclosing_manifest(path: Path) -> dict | None:
    """The raw manifest of the directory holding `path`, if it has one that parses (for rebuild hints only)."""
    try:
        return json.loads((path.parent / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _artefact_of(path: Path) -> Path:
    """The output a file belongs to: its directory when that holds a manifest (or it is the manifest), else itself."""
    return path.parent if path.name == MANIFEST or (path.parent / MANIFEST).is_file() else path


def _missing(path: Path) -> Exception:
    """The error for a file that is not there: damage inside an output that exists, else a stage not yet run."""
    if path.name == MANIFEST and path.parent.is_dir():
        problem = f"{path} is missing (the directory exists, so Snakemake counts the output as complete)"
        return DamagedArtefact(path.parent, [problem], rebuild_command(path.parent))
    if (path.parent / MANIFEST).is_file():
        return DamagedArtefact(path.parent, [f"{path} is missing"], rebuild_command(path.parent, _enclosing_manifest(path)))
    return FileNotFoundError(f"{path} does not exist: run the stage that produces it first")


# --- interrupted writes --------------------------------------------------------------------------------------------


def _legacy_temporary(name: str, sibling: str) -> bool:
    """Temporaries of qsvd before `.tmp-` names: `.<name>.<8 chars>` (directories) and `.<name>.<8 chars>.tmp`."""
    return re.fullmatch(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}(\.tmp)?", sibling) is not None


def stale_temporaries(out: str | Path) -> list[Path]:
    """Temporary siblings of `out` that a writer older than this process left (it was killed mid-write)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    prefix = f".{out.name}{TEMPORARY}"
    stale = []
    for sibling in out.parent.iterdir():
        if sibling.name.startswith(prefix) or _legacy_temporary(out.name, sibling.name):
            try:
                if sibling.lstat().st_mtime < _PROCESS_START:
                    stale.append(sibling)
            except FileNotFoundError:  # another writer's rename
                continue
    return sorted(stale)


def clean_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove what interrupted writers of `out` left beside it; return what was removed."""
    removed = stale_temporaries(out)
    for debris in removed:
        log.info("removing %s, left by an interrupted write of %s", debris, out)
        if debris.is_dir() and not debris.is_symlink():
            shutil.rmtree(debris, ignore_errors=True)
        else:
            debris.unlink(missing_ok=True)
    return removed


def _seal(directory: Path) -> dict[str, dict] | None:
    """Record the size and SHA-256 of every file of a finished directory in its manifest (if it has one)."""
    if not (directory / MANIFEST).is_file():
        return None
    manifest = json.loads((directory / MANIFEST).read_text())
    files = file_records(directory)
    write_json(directory / MANIFEST, {k: v for k, v in manifest.items() if k not in (FILES, DIGEST)} | {FILES: files})
    return files


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success its manifest (if any) records every file's size and
    SHA-256 and it replaces `out_dir`; on error it is removed. Stale temporaries of `out_dir` are removed first."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{TEMPORARY}", dir=out_dir.parent))
    try:
        yield tmp
        files = _seal(tmp)
        if out_dir.exists() or out_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{TEMPORARY}old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)  # out of the way in one rename: never a half-deleted out_dir
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remember(out_dir, files or {})


def _remember(directory: Path, files: dict[str, dict]) -> None:
    """Memoise the digests just computed under the files' final names: no second hash in this process."""
    for name, record in files.items():
        stat = (directory / name).stat()
        _HASH_CACHE[(str((directory / name).resolve()), stat.st_size, stat.st_mtime_ns)] = record["sha256"]


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` then rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMPORARY}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- JSON and tensors ----------------------------------------------------------------------------------------------


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order); an object gets its "content_sha256"."""
    native = json.loads(json.dumps(data, default=_json_default))  # what a reader will parse
    if isinstance(native, dict):
        native = {k: v for k, v in native.items() if k != DIGEST}
        native[DIGEST] = _canonical_digest(native)
    text = json.dumps(native, indent=2) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file and check it: its "content_sha256" and the files it records under "files" (relative to its
    directory). Returns the data without "content_sha256"; raises `DamagedArtefact` naming the path and the rebuild."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        artefact = _artefact_of(path)
        manifest = None if path.name == MANIFEST else _enclosing_manifest(path)
        raise DamagedArtefact(artefact, [f"{path} is not valid JSON ({error})"], rebuild_command(artefact, manifest)) from None
    if not isinstance(data, dict):
        return data
    if DIGEST in data and data[DIGEST] != _canonical_digest(data):
        artefact = _artefact_of(path)
        raise DamagedArtefact(artefact, [f"{path} differs from what was written (its {DIGEST})"], rebuild_command(artefact, data))
    data.pop(DIGEST, None)
    files = data.get(FILES)
    if isinstance(files, dict) and all(isinstance(r, dict) and {"bytes", "sha256"} <= set(r) for r in files.values()):
        check_files(path.parent, files, _artefact_of(path), data)
    return data


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically (contiguous, CPU)."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or unreadable one inside an artefact raises `DamagedArtefact`."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        artefact = _artefact_of(path)
        raise DamagedArtefact(artefact, [f"{path} is not a readable safetensors file ({error})"],
                              rebuild_command(artefact, _enclosing_manifest(path))) from None


def write_artefact(
    directory: str | Path,
    tensors: dict[str, torch.Tensor] | None,
    manifest: dict[str, Any],
    tensors_name: str = "tensors.safetensors",
) -> Path:
    """Write a stage's tensors and its manifest as `directory`, atomically (`atomic_directory`): a temporary sibling
    is filled, sealed (the manifest records every file's size and SHA-256) and renamed into place."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        if tensors is not None:
            write_tensors(tmp / tensors_name, tensors)
            manifest = {**manifest, "tensors": tensors_name}
        write_json(tmp / MANIFEST, manifest)
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an artefact directory, after checking every file it records (`read_json`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist: run the stage that produces it first")
    return read_json(directory / MANIFEST)


def read_artefact(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read back what `write_artefact` wrote, checked."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    tensors = read_tensors(directory / manifest["tensors"]) if "tensors" in manifest else {}
    return tensors, manifest
