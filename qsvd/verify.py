"""`qsvd verify <dir>`: every artefact below a results tree checked against the sizes and SHA-256 it recorded.

A directory holding `manifest.json` is one artefact (its manifest records its files); any other JSON file is a
single-file artefact (a rank plan, an evaluation result: its embedded digest, the files it records). Hidden
directories (`.snakemake`, a writer's temporaries) are not entered; temporaries left by a killed write are listed as
debris (the next run of that stage removes them).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qsvd.artefacts import DIGEST, FILES, MANIFEST, TEMPORARY, DamagedArtefact, read_json

_LEGACY_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}(\.tmp)?")  # qsvd's temporaries before `.tmp-` names


@dataclass
class TreeReport:
    """What `verify_tree` found: damaged artefacts (with their rebuild commands), artefacts that record no
    digests (written before qsvd recorded them: unchecked), temporaries of killed writes, and how many were checked."""

    damaged: list[DamagedArtefact] = field(default_factory=list)
    unchecked: list[Path] = field(default_factory=list)
    debris: list[Path] = field(default_factory=list)
    checked: int = 0


def _is_temporary(name: str) -> bool:
    return (name.startswith(".") and TEMPORARY in name) or _LEGACY_TEMPORARY.fullmatch(name) is not None


def _check(path: Path, report: TreeReport) -> None:
    try:
        data = read_json(path)
    except DamagedArtefact as error:
        report.damaged.append(error)
        return
    report.checked += 1
    if isinstance(data, dict) and "stage" in data and FILES not in data and path.name == MANIFEST:
        report.unchecked.append(path.parent)
    elif isinstance(data, dict) and "stage" in data and path.name != MANIFEST and not _had_digest(path):
        report.unchecked.append(path)


def _had_digest(path: Path) -> bool:
    return f'"{DIGEST}"' in path.read_text()


def verify_tree(root: str | Path) -> TreeReport:
    """Check every artefact below `root` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: give a results tree, e.g. results/")
    report = TreeReport()
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        for name in sorted(subdirectories + files):
            if _is_temporary(name):
                report.debris.append(here / name)
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        if MANIFEST in files:
            _check(here / MANIFEST, report)  # the manifest covers every other file of its directory
            continue
        for name in sorted(files):
            if name.endswith(".json") and not name.startswith("."):
                _check(here / name, report)
    return report


def report_lines(report: TreeReport) -> list[str]:
    """The report as lines for a terminal: each damaged artefact with its rebuild command first."""
    lines = []
    for error in report.damaged:
        lines += [f"DAMAGED {error.artefact}", *(f"  {problem}" for problem in error.problems), f"  rebuild: {error.rebuild}"]
    for path in report.unchecked:
        lines.append(f"unchecked {path} (records no digests: written before qsvd recorded them)")
    for path in report.debris:
        lines.append(f"debris {path} (left by a killed write; the next run of its stage removes it, or delete it)")
    lines.append(f"{report.checked + len(report.damaged)} manifests and JSON files checked, {len(report.damaged)} damaged, "
                 f"{len(report.unchecked)} unchecked, {len(report.debris)} temporaries left by killed writes")
    return lines
