"""Paths and config values reach the shell quoted (issue 13 item 1).

The pipeline really runs (data and statistics: every kind of path a shell line takes) from a checkout, a working
directory, a local model and local text files whose paths hold a space, a quote and shell operators; JSON values
(demo recipe, quantization spec, result labels) stay one argument each.
"""

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.workflow.conftest import REPO
from tests.workflow.local_sources import dry_run_jobs, run_snakemake, write_config, write_model, write_text

pytestmark = pytest.mark.workflow

ODD = "a b'c"  # a space and a quote
OPERATORS = "p||touch x||"  # ran `touch x` when pasted unquoted into a shell line


def copy_checkout(destination: Path) -> Path:
    """The checkout's files (tracked, and untracked but not ignored), as a clone would have them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            (destination / name).write_bytes(source.read_bytes())
    return destination


def test_the_pipeline_runs_from_paths_with_a_space_a_quote_and_shell_operators(tmp_path):
    root = tmp_path / ODD
    checkout = copy_checkout(root / "checkout")
    texts = root / OPERATORS
    config = write_config(root / "config.yaml", write_model(root / "model"), write_text(texts / "calibration.txt"),
                          write_text(texts / "evaluation.txt", seed=1))
    workdir = root / "work dir"
    out = run_snakemake(checkout / "workflow" / "Snakefile", workdir, "--configfile", str(config), "--cores", "2",
                        "--until", "activation_stats")
    assert out.returncode == 0, out.stderr[-5000:]
    assert len(list(workdir.glob("results/data/*/manifest.json"))) == 1  # the calibration set, read from `texts`
    assert len(list(workdir.glob("results/tiny/calib~*/stats/manifest.json"))) == 1  # the model, read from root
    assert not list(tmp_path.rglob("x")), "a path's shell operators ran as a command"


def test_every_json_value_and_path_stays_one_argument(tmp_path):
    """JSON holds spaces and double quotes: each --recipe, --spec and --labels value parses back whole, and every job
    writes to its own output and log, on the test config's whole DAG."""
    out = run_snakemake(REPO / "workflow" / "Snakefile", tmp_path, "--configfile", str(REPO / "config" / "test.yaml"),
                        "--dry-run", "--printshellcmds", "--cores", "1")
    assert out.returncode == 0, out.stderr[-5000:]
    jobs = [job for job in dry_run_jobs(out.stdout) if job.shell]
    recipe = yaml.safe_load((REPO / "config" / "test.yaml").read_text())["demo"]["recipe"]
    seen = set()
    for job in jobs:
        args = shlex.split(job.shell)
        for flag in ("--recipe", "--spec", "--labels"):
            if flag in args:
                value = json.loads(args[args.index(flag) + 1])
                assert flag != "--recipe" or value == recipe, job.shell
                seen.add(flag)
        assert args[args.index("2>") + 1] == job.fields["log"], job.shell
        if "--out" in args:
            assert args[args.index("--out") + 1] in job.files("output"), job.shell
    assert seen == {"--recipe", "--spec", "--labels"}
