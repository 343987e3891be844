import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the real workflow in `workdir` with the given extra arguments."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
         "--directory", str(workdir), *args],
        capture_output=True, text=True, cwd=workdir,
        # the rules call `python`: make it this interpreter, as `make test` does through PATH
        env=os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )


@pytest.fixture(scope="session")
def finished_workdir(tmp_path_factory) -> Path:
    """A workdir in which the reduced demo config (config/test.yaml) has run to the end."""
    workdir = tmp_path_factory.mktemp("workflow")
    # one thread per job, two jobs at a time: the demo's jobs are mostly interpreter start-up and imports
    out = snakemake(workdir, "--configfile", str(REPO / "config" / "test.yaml"), "--cores", "2", "--max-threads", "1")
    assert out.returncode == 0, out.stderr[-5000:]
    return workdir
