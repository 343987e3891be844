"""Damaged artefacts are detected and named with their rebuild command; interrupted writes leave no half-written
output and their debris is removed by the next run (issue 13, items 3, 8 and the read-error part of 9)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import qsvd.artefacts as artefacts
from qsvd.artefacts import REBUILDS, DamagedArtefact, read_artefact, read_json, write_artefact, write_json
from qsvd.cli import build_parser, main
from qsvd.data.records import Record, write_records
from qsvd.models.checkpoint import QUANTIZED_WEIGHTS, TENSORS, export_checkpoint, load_checkpoint
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.decompose import read_decomposition, run_decompose
from qsvd.stages.evaluate import run_evaluate
from qsvd.stages.importance import run_importance
from qsvd.stages.lowrank_model import run_lowrank_model
from qsvd.stages.quantize import QuantSpec, run_quantize
from qsvd.stages.rank_plan import read_plan, run_rank_plan
from tests.conftest import build_tiny

FAMILY = "llama"
WORKFLOW_RULES = Path(__file__).resolve().parents[1] / "workflow" / "rules"


def _dataset(directory: Path) -> Path:
    (directory / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i, (question, answer) in enumerate([("what color is the shape?", "red"), ("is there a circle?", "yes")]):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(directory / "images" / f"{i}.png")
        records.append(Record(id=str(i), task="easy-vqa", question=question, answer=answer, answers=[answer],
                              image=f"images/{i}.png"))
    write_records(directory, records)
    return directory


# Each kind: how its stage (re)writes it under `tree`, the file a test truncates, the reader, the expected rebuild.
STAGES = {
    "stats": lambda t: run_activation_stats(str(t / "model"), FAMILY, t / "data", t / "stats"),
    "gram": lambda t: run_activation_stats(str(t / "model"), FAMILY, t / "data", t / "gram", gram=True),
    "decomposition": lambda t: run_decompose(str(t / "model"), FAMILY, t / "stats", "joint", "abs_mean", 0.5,
                                             t / "decomposition"),
    "importance": lambda t: run_importance(str(t / "model"), FAMILY, t / "decomposition", t / "data", t / "importance"),
    "plan.json": lambda t: run_rank_plan(t / "decomposition", t / "importance", "importance", "R1", 0.8, 1, t / "plan.json"),
    "lowrank": lambda t: run_lowrank_model(str(t / "model"), FAMILY, t / "decomposition", t / "plan.json", 0.2, t / "lowrank"),
    "quantized": lambda t: run_quantize(str(t / "lowrank"), FAMILY, t / "data", QuantSpec(weight_bits=8, act_bits=8, beta=0.2),
                                        t / "quantized"),
    "export": lambda t: export_checkpoint(t / "quantized", t / "export"),
    "eval/easy-vqa.json": lambda t: run_evaluate(str(t / "lowrank"), FAMILY, t / "data", t / "eval" / "easy-vqa.json", 2,
                                                 {"method": "qsvd"}),
}
CASES = {  # kind: (file truncated, relative to the tree; reader; what the error advises)
    "stats": ("stats/tensors.safetensors", read_artefact, "snakemake --forcerun activation_stats"),
    "gram": ("gram/tensors.safetensors", read_artefact, "snakemake --forcerun input_gram"),
    "decomposition": ("decomposition/tensors.safetensors", read_decomposition, "snakemake --forcerun decompose"),
    "importance": ("importance/tensors.safetensors", read_artefact, "snakemake --forcerun importance"),
    "plan.json": ("plan.json", read_plan, "snakemake --forcerun rank_plan"),
    "lowrank": (f"lowrank/{TENSORS}", load_checkpoint, "snakemake --forcerun lowrank_model"),
    "quantized": (f"quantized/{QUANTIZED_WEIGHTS}", load_checkpoint, "snakemake --forcerun quantize"),
    "export": ("export/model.safetensors", load_checkpoint, "qsvd export --model"),
    "eval/easy-vqa.json": ("eval/easy-vqa.predictions.jsonl", read_json, "snakemake --forcerun evaluate"),
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """Every artefact kind of one tiny run, made once; tests damage copies of it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tree = tmp_path_factory.mktemp("tree")
    model, processor = build_tiny(FAMILY, kv_heads=1)
    model.save_pretrained(tree / "model")
    processor.save_pretrained(tree / "model")
    _dataset(tree / "data")
    for write in STAGES.values():
        write(tree)
    torch.set_num_threads(threads)
    return tree


@pytest.fixture
def tree(pipeline, tmp_path, single_thread) -> Path:
    """A private copy of the run (the base model stays shared: lean checkpoints refer to it by path)."""
    copy = tmp_path / "tree"
    shutil.copytree(pipeline, copy, ignore=lambda d, names: ["model"] if Path(d) == pipeline else [])
    (copy / "model").symlink_to(pipeline / "model")
    return copy


def _verify(tree: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(["verify", str(tree)])
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", list(CASES))
def test_a_truncated_file_is_named_with_its_rebuild_and_rerunning_the_stage_recovers(tree, kind, capsys):
    damaged, reader, advice = CASES[kind]
    assert _verify(tree, capsys)[0] == 0
    _truncate(tree / damaged)
    with pytest.raises(DamagedArtefact, match=re.escape(str(tree / damaged))) as error:
        reader(tree / kind)
    assert advice in str(error.value)

    code, out = _verify(tree, capsys)
    assert code == 1 and f"DAMAGED {tree / kind}" in out and advice in out and str(tree / damaged) in out

    output = tree / kind
    shutil.rmtree(output) if output.is_dir() else output.unlink()
    STAGES[kind](tree)
    reader(output)
    code, out = _verify(tree, capsys)
    assert code == 0 and "0 damaged" in out


def test_an_edited_json_artefact_and_a_garbage_plan_are_damage(tree, capsys):
    result = json.loads((tree / "eval" / "easy-vqa.json").read_text())
    (tree / "eval" / "easy-vqa.json").write_text(json.dumps({**result, "score": 1.0}, indent=2))
    with pytest.raises(DamagedArtefact, match="easy-vqa.json differs from what was written.*--forcerun evaluate"):
        read_json(tree / "eval" / "easy-vqa.json")
    (tree / "plan.json").write_text("\x00garbage")
    with pytest.raises(DamagedArtefact, match="plan.json is not valid JSON.*--forcerun rank_plan"):
        run_lowrank_model(str(tree / "model"), FAMILY, tree / "decomposition", tree / "plan.json", 0.2, tree / "lowrank")
    assert (tree / "lowrank" / TENSORS).is_file()  # the good checkpoint was not touched
    code, out = _verify(tree, capsys)
    assert code == 1 and out.count("DAMAGED") == 2


def test_a_missing_file_inside_a_complete_output_advises_forcerun(tree):
    (tree / "importance" / "tensors.safetensors").unlink()
    with pytest.raises(DamagedArtefact, match=r"tensors.safetensors is missing.*snakemake --forcerun importance"):
        read_artefact(tree / "importance")
    (tree / "stats" / "manifest.json").unlink()
    with pytest.raises(DamagedArtefact, match=r"manifest.json is missing.*counts the output as complete.*--forcerun activation_stats"):
        read_artefact(tree / "stats")
    with pytest.raises(FileNotFoundError, match="does not exist: run the stage that produces it first"):
        read_artefact(tree / "never-made")


def test_manifests_record_every_file_and_legacy_ones_are_read_unchecked(tree, tmp_path):
    manifest = read_json(tree / "lowrank" / "manifest.json")
    on_disk = {p.relative_to(tree / "lowrank").as_posix() for p in (tree / "lowrank").rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"} and TENSORS in manifest["files"]
    assert all(len(r["sha256"]) == 64 and r["bytes"] > 0 for r in manifest["files"].values())
    assert set(read_json(tree / "eval" / "easy-vqa.json")["files"]) == {"easy-vqa.predictions.jsonl"}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "manifest.json").write_text(json.dumps({"stage": "activation_stats"}))  # before digests were recorded
    assert read_artefact(legacy) == ({}, {"stage": "activation_stats"})


def test_every_rebuild_names_a_workflow_rule_and_a_qsvd_command():
    rules = set(re.findall(r"^\s*rule (\w+):", "".join(p.read_text() for p in WORKFLOW_RULES.glob("*.smk")), re.M))
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for stage, (rule, command) in REBUILDS.items():
        assert rule is None or rule in rules, f"{stage}: no rule {rule!r} in {WORKFLOW_RULES}"
        assert command.split()[0] in commands, f"{stage}: no qsvd subcommand {command!r}"


KILLED_WRITE = """
import os, sys, torch
import qsvd.artefacts as artefacts
artefacts.write_json = lambda path, data: os._exit(9)  # killed after the tensors, before the manifest
artefacts.write_artefact(sys.argv[1], {"x": torch.ones(3)}, {"stage": "activation_stats"})
"""


def test_a_killed_write_leaves_no_output_and_the_next_run_removes_its_debris(tmp_path, monkeypatch, capsys):
    out = tmp_path / "stats"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out)], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert not out.exists()  # never a half-written final name
    [debris] = tmp_path.glob(".stats.tmp-*")
    assert (debris / "tensors.safetensors").is_file() and not (debris / "manifest.json").exists()
    legacy = tmp_path / ".model.abc12_yz"  # a checkpoint temporary of qsvd before `.tmp-` names
    legacy.mkdir()
    code, listing = _verify(tmp_path, capsys)
    assert code == 0 and f"debris {debris}" in listing and f"debris {legacy}" in listing

    monkeypatch.setattr(artefacts, "_PROCESS_START", time.time() + 1)  # the next run is a later process
    write_artefact(out, {"x": torch.ones(3)}, {"stage": "activation_stats"})
    assert not debris.exists() and read_artefact(out)[0]["x"].tolist() == [1.0, 1.0, 1.0]
    assert artefacts.clean_stale_temporaries(tmp_path / "model") == [legacy] and not legacy.exists()


def test_an_interrupted_write_keeps_the_previous_output_whole(tmp_path):
    out = tmp_path / "decomposition"
    write_artefact(out, {"x": torch.zeros(2)}, {"stage": "decompose"})
    with pytest.raises(KeyboardInterrupt):
        with artefacts.atomic_directory(out) as tmp:
            (tmp / "tensors.safetensors").write_bytes(b"partial")
            assert read_artefact(out)[0]["x"].tolist() == [0.0, 0.0]  # readers see the old, whole output meanwhile
            raise KeyboardInterrupt
    assert read_artefact(out)[0]["x"].tolist() == [0.0, 0.0] and not list(tmp_path.glob(".decomposition.tmp-*"))


def test_a_stage_removes_stale_temporaries_of_its_output_before_it_runs(tree, monkeypatch):
    stale = tree / ".stats.tmp-killed"
    (stale / "part").mkdir(parents=True)
    monkeypatch.setattr(artefacts, "_PROCESS_START", time.time() + 1)
    STAGES["stats"](tree)
    assert not stale.exists()
    write_json(tree / "x.json", {"a": 1})
    assert read_json(tree / "x.json") == {"a": 1}
