"""A local model.source and a dataset's local_dir are inputs of the rules that read them (issue 13 item 6): replaced
weights or an edited text file re-run their readers instead of leaving stale results."""

import os
import shlex
import time

import pytest

from tests.workflow.conftest import REPO
from tests.workflow.local_sources import dry_run_jobs, run_snakemake, write_config, write_model, write_text

pytestmark = pytest.mark.workflow

SNAKEFILE = REPO / "workflow" / "Snakefile"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(config, model directory, calibration text, evaluation text), the inputs dated an hour ago."""
    root = tmp_path_factory.mktemp("local")
    model, texts = write_model(root / "model"), root / "texts"
    calibration, evaluation = write_text(texts / "calibration.txt"), write_text(texts / "evaluation.txt", seed=1)
    an_hour_ago = time.time() - 3600
    for path in [*model.iterdir(), calibration, evaluation]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    return write_config(root / "config.yaml", model, calibration, evaluation), model, calibration, evaluation


def dry_run(workdir, config):
    out = run_snakemake(SNAKEFILE, workdir, "--configfile", str(config), "--dry-run", "--printshellcmds",
                        "--cores", "1")
    assert out.returncode == 0, out.stderr[-5000:]
    return dry_run_jobs(out.stdout)


@pytest.fixture(scope="module")
def listed(local, tmp_path_factory):
    """The jobs of a dry run in an empty working directory, before any test changes the sources."""
    return dry_run(tmp_path_factory.mktemp("empty"), local[0])


def argument(job, flag):
    args = shlex.split(job.shell)
    return args[args.index(flag) + 1] if flag in args else None


def test_every_job_that_reads_a_local_source_has_its_files_as_inputs(local, listed):
    _, model, calibration, evaluation = local
    weights = {str(path) for path in model.iterdir()}
    readers = [job for job in listed if argument(job, "--model") == str(model)]
    assert {job.rule for job in readers} == {"activation_stats", "input_gram", "decompose", "importance",
                                             "lowrank_model", "quantize", "evaluate", "benchmark"}
    for job in readers:
        assert weights <= set(job.files("input")), (job.rule, job.fields.get("input"))
    data = {argument(job, "--local-dir"): job.files("input") for job in listed if job.rule == "materialise_dataset"}
    assert data == {str(calibration): [str(calibration)], str(evaluation): [str(evaluation)]}


def test_replaced_weights_and_an_edited_text_rerun_their_readers(local, listed, tmp_path):
    """Outputs in place and newer than their inputs; then the weights are replaced and the evaluation text edited."""
    config, model, calibration, evaluation = local
    workdir = tmp_path / "work"
    made = [job for job in listed if job.rule in ("materialise_dataset", "activation_stats")]
    a_minute_ago = time.time() - 60
    for job in made:  # stand-ins for finished jobs: their output folders and benchmark files
        output, benchmark = workdir / job.fields["output"], workdir / job.fields["benchmark"]
        output.mkdir(parents=True)
        benchmark.parent.mkdir(parents=True, exist_ok=True)
        benchmark.touch()
        for path in (output, benchmark):
            os.utime(path, (a_minute_ago, a_minute_ago))
    write_model(model, seed=1)
    evaluation.write_text(evaluation.read_text() + "\nOne more paragraph.\n")
    reasons = {(job.rule, argument(job, "--local-dir")): job.fields["reason"]
               for job in dry_run(workdir, config) if job.rule in ("materialise_dataset", "activation_stats")}
    assert reasons.keys() == {("activation_stats", None), ("materialise_dataset", str(evaluation))}, reasons
    assert reasons["activation_stats", None].startswith("Updated input files: ")
    assert str(model / "model.safetensors") in reasons["activation_stats", None]
    assert reasons["materialise_dataset", str(evaluation)] == f"Updated input files: {evaluation}"
