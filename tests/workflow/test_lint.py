"""`snakemake --lint` passes (issue 13 item 9; `make lint` runs it for every config with its own rules, and CI runs
`make lint`): in particular no shell line reads a variable from outside its rule."""

import pytest

from tests.workflow.conftest import REPO, snakemake

pytestmark = pytest.mark.workflow


def test_the_workflow_lints_clean(tmp_path):
    out = snakemake(tmp_path, "--configfile", str(REPO / "config" / "config.yaml"), "--lint")
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr
