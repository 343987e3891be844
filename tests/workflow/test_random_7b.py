"""The whole DAG at LLaVA-1.5-7B's width: random weights, one of its 32 decoder layers (config/llava-1.5-7b-random.yaml
cut from two to one: the per-layer stages are the suite's slowest at 4096 width)."""

import json
from pathlib import Path

import pytest
import yaml

from qsvd.artefacts import read_json
from tests.workflow.conftest import REPO, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def _bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _cheaper_config(tmp_path: Path) -> Path:
    """The shipped config with the LM at full width but fewer of what only adds time: 1 decoder layer (of 2), 2 of
    CLIP's 24 layers, 2 samples each, β fixed (no per-layer search)."""
    config = yaml.safe_load((REPO / "config" / "llava-1.5-7b-random.yaml").read_text())
    config["random_model"]["layers"] = 1
    config["random_model"]["vision_layers"] = 2
    config["calibration"]["num_samples"] = 2
    config["evaluation"]["tasks"][0]["num_samples"] = 2
    config["quantization"]["beta"] = 0.2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_7b_wide_dag_runs_in_bfloat16_with_lean_leaves(tmp_path):
    out = snakemake(tmp_path, "--configfile", str(_cheaper_config(tmp_path)), "--cores", "2")
    assert out.returncode == 0, out.stderr[-5000:]
    results = tmp_path / "results" / "llava-1.5-7b-random"
    base = results / "model"
    assert read_json(base / "manifest.json")["weights"] == "random"
    leaves = [p.parent for p in results.glob("calib~*/svd~*/rank~*/factors~*/model/manifest.json")]
    quantized = [p.parent for p in results.glob("calib~*/svd~*/rank~*/factors~*/quant~*/model/manifest.json")]
    assert len(leaves) == 1 and len(quantized) == 1
    for checkpoint in (*leaves, *quantized):
        manifest = read_json(checkpoint / "manifest.json")
        assert manifest["dtype"] == "bfloat16" and manifest["base"]["source"].endswith("llava-1.5-7b-random/model")
    # Goal at R1 = 0.6: a low-rank leaf holds at most 0.2x the base model's bytes (0.06x measured at 1 layer).
    assert _bytes(leaves[0]) <= 0.2 * _bytes(base)
    # A W4A4 leaf holds the bf16 embeddings and lm_head (the rotation changes them), which at 1 of 32 layers (and 2
    # CLIP layers) dominate: 0.66x measured here (0.54x at 2 layers); the README's benchmark extrapolates 0.30x to 32.
    assert _bytes(quantized[0]) <= 0.7 * _bytes(base)
    scores = [json.loads(p.read_text()) for p in results.glob("**/eval/*.json")]
    assert len(scores) == 3 and all(s["num_samples"] == 2 for s in scores)
    assert (results / "report" / "tables.md").is_file()
