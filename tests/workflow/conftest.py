import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "workflow" / "Snakefile",
              path_first: tuple[Path, ...] = (), env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real workflow (or `snakefile`) in `workdir` with the given extra arguments. A failed job's log is
    printed (--show-failed-logs), so an assertion that shows stderr shows why the job failed."""
    # the rules call `python`: make it this interpreter, as `make test` does through PATH
    path = os.pathsep.join([*map(str, path_first), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
         "--show-failed-logs", *args],
        capture_output=True, text=True, cwd=workdir, env=os.environ | {"PATH": path} | (env or {}),
    )


@pytest.fixture(scope="session")
def finished_workdir(tmp_path_factory) -> Path:
    """A workdir in which the reduced demo config (config/test.yaml) has run to the end."""
    workdir = tmp_path_factory.mktemp("workflow")
    # one thread per job, two jobs at a time: the demo's jobs are mostly interpreter start-up and imports
    out = snakemake(workdir, "--configfile", str(REPO / "config" / "test.yaml"), "--cores", "2", "--max-threads", "1")
    assert out.returncode == 0, out.stderr[-5000:]
    return workdir
