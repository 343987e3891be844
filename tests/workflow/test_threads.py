"""Threads are the rules' own numbers, not `workflow.cores` (issue 13 item 7): Snakemake sub-commands that take no
--cores (--unlock, --report) work, and offering more cores does not give a job more threads."""

import pytest

from tests.workflow.conftest import REPO, snakemake
from tests.workflow.local_sources import dry_run_jobs

pytestmark = pytest.mark.workflow

CONFIG = ("--configfile", str(REPO / "config" / "test.yaml"))
OFFERED = 64  # more cores than any rule asks for


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("threads")
    out = snakemake(workdir, *CONFIG, "--dry-run", "--printshellcmds", "--cores", str(OFFERED))
    assert out.returncode == 0, out.stderr[-5000:]
    return dry_run_jobs(out.stdout)


def test_a_job_gets_its_rules_threads_whatever_the_cores(jobs):
    threaded = [job for job in jobs if "--threads" in job.shell.split()]
    assert threaded
    for job in threaded:
        threads = int(job.fields.get("threads", 1))
        assert threads < OFFERED, (job.rule, threads)
        assert f" --threads {threads} " in job.shell, job.shell  # the command runs as many torch threads


def test_unlock_and_report_run_without_cores(jobs, tmp_path):
    unlock = snakemake(tmp_path, *CONFIG, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-5000:]
    for job in jobs:  # the report's inputs, as placeholders: --report reads no content of these here
        if job.rule in ("report", "benchmark_report", "evaluate"):  # the outputs marked for the report
            for path in job.files("output"):
                (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / path).write_text("placeholder\n")
    report = snakemake(tmp_path, *CONFIG, "--report", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr[-5000:]
    assert (tmp_path / "report.html").stat().st_size > 0
