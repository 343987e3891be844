"""The workflow runs the start-up checks (qsvd.preflight) before any job: a value only a job would have rejected
stops `snakemake` at once, naming the key (every case is covered in-process by tests/test_preflight.py)."""

import pytest

from tests.workflow.conftest import REPO, snakemake

pytestmark = pytest.mark.workflow


def test_an_unknown_recipe_key_stops_the_run_before_the_demo_model_job(tmp_path):
    config = (REPO / "config" / "test.yaml").read_text().replace("vision_epochs: 2", "vision_epoch: 2")
    path = tmp_path / "typo.yaml"
    path.write_text(config)
    out = snakemake(tmp_path, "--configfile", str(path), "--dry-run", "--cores", "1")
    assert out.returncode != 0
    assert "invalid configuration: unknown config key demo.recipe.vision_epoch" in out.stderr + out.stdout
    assert "demo_model" not in out.stdout  # no job was planned
