"""A local model.source and local text datasets for workflow tests, and a reader of Snakemake's dry-run job list.

The model is a tiny Llama saved as `save_pretrained` saves it, the datasets two `.txt` files (dataset `text`), and the
config is config/test.yaml pointed at them: every stage on them takes seconds.
"""

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.conftest import build_tiny
from tests.workflow.conftest import REPO, snakemake

PARAGRAPH_WORDS = 300  # one passage per paragraph (qsvd.data.text_corpus: passages of >= 256 words)


def write_model(directory: Path, seed: int = 0) -> Path:
    model, processor = build_tiny("llama", kv_heads=1, seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def write_text(path: Path, paragraphs: int = 30, seed: int = 0) -> Path:
    """`paragraphs` passages of text (a single file is split by position: 90% train, 10% test)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    words = [f"w{(seed + i * 7) % 53}" for i in range(PARAGRAPH_WORDS)]
    path.write_text("\n\n".join(" ".join(words[i:] + words[:i]) for i in range(paragraphs)) + "\n")
    return path


def write_config(path: Path, model: Path, calibration_text: Path, evaluation_text: Path) -> Path:
    """config/test.yaml on the local model and texts: two methods (one whitening) at one budget, so every rule runs."""
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config.pop("demo")
    config["model"] = {"name": "tiny", "source": str(model), "family": "llama"}
    config["methods"] = ["qsvd", "svd-llm"]
    config["rank"]["budgets"] = [0.9]
    text = {"dataset": "text", "seed": 0}
    config["calibration"] = text | {"split": "train", "num_samples": 4, "local_dir": str(calibration_text)}
    config["evaluation"]["tasks"] = [text | {"split": "test", "num_samples": 2, "local_dir": str(evaluation_text)}]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_snakemake(snakefile: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake on `snakefile` in `workdir` (made if absent), as conftest.snakemake runs the real workflow."""
    workdir.mkdir(parents=True, exist_ok=True)
    return snakemake(workdir, *args, snakefile=snakefile)


@dataclass
class Job:
    """A job as a dry run (`-n -p`) lists it."""

    rule: str
    fields: dict[str, str] = field(default_factory=dict)
    shell: str = ""

    def files(self, key: str) -> list[str]:
        return self.fields[key].split(", ") if key in self.fields else []


def dry_run_jobs(log: str) -> list[Job]:
    """The `rule X:` blocks of a dry run's output: their indented `key: value` fields and the `Shell command:` line."""
    jobs = []
    for line in log.splitlines():
        if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
            jobs.append(Job(line.split()[1][:-1]))
        elif jobs and line.startswith("    ") and ": " in line:
            key, _, value = line.strip().partition(": ")
            jobs[-1].fields.setdefault(key, value)
        elif jobs and line.startswith("Shell command: ") and line != "Shell command: None":  # None: no shell
            jobs[-1].shell = line[len("Shell command: "):]
    return jobs
