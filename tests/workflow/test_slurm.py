"""The SLURM profile really submits: the workflow runs through sbatch/srun stand-ins (tests/workflow/slurm_standin).

A dry run never builds an sbatch line, so it cannot see a submission the plugin or SLURM would refuse. Here the
real executor plugin submits every job to stand-in SLURM commands that check their options as sbatch and srun do,
record each command line, and run the job in place. The oracle for what a job should ask for is Snakemake's own
account of the job, printed by the same run before it submits it (`rule X:` ... `jobid:` ... `threads:` ...
`resources:`), matched to the sbatch line through the plugin's `Job N has been submitted with SLURM jobid M`: the
test checks the translation (mem_mb -> --mem, runtime -> -t, threads -> --cpus-per-task, gpu -> --gpus) for
whatever resources the rules declare, and that the job step asked srun for the same GPUs.
"""

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.workflow.conftest import REPO, snakemake

pytestmark = pytest.mark.workflow

STANDIN = Path(__file__).resolve().parent / "slurm_standin"
PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
ACCOUNT, PARTITION = "qsvd-test", "main"  # the stand-in cluster's (slurm_standin/_cluster.py)
# The pipeline up to a rank plan: data and rank_plan read no model; demo_model builds one; activation_stats,
# decompose and importance compute on it (the stages that may declare a GPU).
UNTIL = "rank_plan"
# Status polling every second instead of the plugin's 40 s (jobs finish within sbatch here); no retries, so a
# failure shows at once; --cores 2 caps threads at this machine's cores (each job's --cpus-per-task).
FAST = ("--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1",
        "--retries", "0", "--cores", "2")


def run_snakemake(workdir: Path, state: Path, *args: str) -> subprocess.CompletedProcess:
    """The real workflow in `workdir`, with the stand-in SLURM commands first on PATH and their state in `state`."""
    return snakemake(workdir, *args, path_first=(STANDIN,), env={"QSVD_SLURM_STANDIN_DIR": str(state)})


def small_config(path: Path) -> Path:
    """config/test.yaml cut to one method, one budget, no quantization and a seconds-long demo model."""
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["methods"] = config["methods"][:1]
    config["rank"]["budgets"] = config["rank"]["budgets"][:1]
    config.pop("quantization", None)
    config["demo"].update(max_minutes=0.5, recipe={"vision_epochs": 0.5, "lm_epochs": 0.1, "max_train_images": 100,
                                                   "eval_questions": 10})
    config["calibration"]["num_samples"] = 4
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def profile_with_account(folder: Path) -> Path:
    """The shipped profile with its commented account and partition filled in, as a user would."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["default-resources"] |= {"slurm_account": ACCOUNT, "slurm_partition": PARTITION}
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Job:
    """A job as Snakemake announced it: rule, threads and evaluated resources."""

    rule: str
    threads: int
    resources: dict


def announced_jobs(log: str) -> dict[int, Job]:
    """Snakemake jobid -> Job, from the `rule X:` blocks it prints before running each job (localrules excluded)."""
    jobs = {}
    lines = log.splitlines()
    for start, header in enumerate(lines):
        if not re.fullmatch(r"rule \S+:", header):
            continue
        fields = {}
        for line in lines[start + 1:]:
            if not line.startswith("    "):
                break
            key, _, value = line.strip().partition(": ")
            fields.setdefault(key, value)
        resources = dict(item.split("=", 1) for item in fields.get("resources", "").split(", ") if "=" in item)
        jobs[int(fields["jobid"])] = Job(header[len("rule "):-1], int(fields.get("threads", 1)), resources)
    return jobs


def declared_gpus(job: Job) -> int:
    return int(job.resources.get("gpu", 0))


def requested_gpus(options: dict) -> int:
    """GPUs an sbatch/srun option set asks for: --gpus=[type:]N or the gpu entries of --gres."""
    count = 0
    if options.get("gpus") is not None:
        count += int(options["gpus"].rsplit(":", 1)[-1])
    for entry in (options.get("gres") or "").split(","):
        parts = entry.split(":")
        if parts[0] == "gpu":
            count += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return count


@dataclass
class SlurmRun:
    workdir: Path
    output: str
    jobs: dict[int, Job]  # Snakemake jobid -> what Snakemake says the job needs
    submitted: dict[int, int]  # Snakemake jobid -> SLURM job id
    sbatch: dict[int, dict]  # SLURM job id -> recorded sbatch call
    srun: dict[int, dict]  # SLURM job id -> recorded srun call (the job step)
    rejected: list[dict]  # sbatch or srun calls the stand-ins refused


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory) -> SlurmRun:
    root = tmp_path_factory.mktemp("slurm")
    workdir, state = root / "work", root / "cluster"
    workdir.mkdir()
    profile = profile_with_account(root / "profile")
    out = run_snakemake(workdir, state, "--profile", str(profile), "--configfile", str(small_config(root / "c.yaml")),
                        "--until", UNTIL, *FAST)
    output = out.stdout + out.stderr
    slurm_logs = "".join(p.read_text()[-3000:] for p in (workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert out.returncode == 0, output[-6000:] + "\n--- kept SLURM job logs ---\n" + slurm_logs
    sbatch, srun = jsonl(state / "sbatch.jsonl"), jsonl(state / "srun.jsonl")
    submitted = {int(a): int(b) for a, b in re.findall(r"^Job (\d+) has been submitted with SLURM jobid (\d+)",
                                                       output, flags=re.M)}
    return SlurmRun(workdir, output, announced_jobs(output), submitted,
                    sbatch={e["jobid"]: e for e in sbatch if e["jobid"] is not None},
                    srun={int(e["jobid"]): e for e in srun if e["error"] is None},
                    rejected=[e for e in sbatch + srun if e["error"] is not None])


@pytest.mark.slow
def test_every_job_is_one_accepted_sbatch_submission_run_as_one_srun_step(slurm_run):
    run = slurm_run
    assert not run.rejected, run.rejected
    assert run.jobs, "no `rule X:` job blocks in Snakemake's output:\n" + run.output[-3000:]
    assert sorted(run.submitted) == sorted(run.jobs)  # every job announced was submitted, and only those
    assert len(run.sbatch) == len(run.jobs) == len(set(run.submitted.values()))  # one sbatch call per job
    assert sorted(run.sbatch) == sorted(run.submitted.values()) == sorted(run.srun)
    rules = {job.rule for job in run.jobs.values()}
    assert {"materialise_dataset", "demo_model", UNTIL} <= rules and len(rules) >= 5, rules
    assert list(run.workdir.glob("results/*/calib~*/svd~*/rank~*/plan.json"))


@pytest.mark.slow
def test_each_submission_carries_the_jobs_memory_time_cpus_account_and_rule(slurm_run):
    for jobid, job in slurm_run.jobs.items():
        call = slurm_run.sbatch[slurm_run.submitted[jobid]]
        options = call["options"]
        assert options["mem"] == job.resources["mem_mb"], (job, call["argv"])
        assert options["time"] == job.resources["runtime"], (job, call["argv"])
        assert options["cpus-per-task"] == str(job.threads), (job, call["argv"])
        assert (options["account"], options["partition"]) == (ACCOUNT, PARTITION), call["argv"]
        assert options["comment"] == f"rule_{job.rule}" or options["comment"].startswith(f"rule_{job.rule}_wildcards_")
        assert "wrap" in options and "--executor slurm-jobstep" in options["wrap"]


@pytest.mark.slow
def test_gpus_are_requested_for_exactly_the_jobs_whose_rules_declare_them(slurm_run):
    for jobid, job in slurm_run.jobs.items():
        slurm_id = slurm_run.submitted[jobid]
        sbatch, step = slurm_run.sbatch[slurm_id], slurm_run.srun[slurm_id]
        assert requested_gpus(sbatch["options"]) == declared_gpus(job), (job, sbatch["argv"])
        assert requested_gpus(step["options"]) == declared_gpus(job), (job, step["argv"])


@pytest.mark.slow
def test_the_run_has_jobs_with_and_without_a_gpu(slurm_run):
    """Keeps the GPU check above from passing vacuously: the model stages declare `gpu` (compute.device auto)."""
    gpus = {job.rule: declared_gpus(job) for job in slurm_run.jobs.values()}
    assert any(gpus.values()) and not all(gpus.values()), gpus
    assert gpus["materialise_dataset"] == 0 and gpus[UNTIL] == 0


def test_gpu_flags_in_slurm_extra_fail_at_submission(tmp_path):
    """What the old profile did (`slurm_extra: "'--gres=gpu:1'"`): a dry run passes, a real run fails before sbatch."""
    config = small_config(tmp_path / "c.yaml")
    extra = ("--set-resources", "materialise_dataset:slurm_extra='--gres=gpu:1'")
    args = ("--profile", str(PROFILE.parent), "--configfile", str(config), "--until", "materialise_dataset", *extra)
    dry = run_snakemake(tmp_path, tmp_path / "cluster", *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = run_snakemake(tmp_path, tmp_path / "cluster", *args, *FAST)
    assert out.returncode != 0
    assert "is not allowed in the 'slurm_extra' parameter" in out.stdout + out.stderr
    assert not jsonl(tmp_path / "cluster" / "sbatch.jsonl")


def test_the_standins_refuse_what_slurm_refuses(tmp_path):
    env = os.environ | {"PATH": f"{STANDIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        "QSVD_SLURM_STANDIN_DIR": str(tmp_path / "cluster")}

    def call(*argv):
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env)

    for command in ("sbatch", "srun", "squeue", "sacct", "scontrol", "sinfo", "sacctmgr", "sshare", "scancel"):
        assert os.access(STANDIN / command, os.X_OK), f"{STANDIN / command} is not executable"
    assert "unrecognized option '--bogus'" in call("sbatch", "--bogus", "--wrap", "true").stderr
    assert "script arguments not permitted" in call("sbatch", "--wrap", "true", "job.sh").stderr
    assert "Invalid account" in call("sbatch", "-A", "nobody", "--wrap", "true").stderr
    assert "Invalid time limit" in call("sbatch", "-t", "4h", "--wrap", "true").stderr
    assert "Invalid --gpus" in call("sbatch", "--gpus=one", "--wrap", "true").stderr
    assert "inside an sbatch allocation" in call("srun", "true").stderr
    ok = call("sbatch", "--parsable", "--job-name", "run", "-t", "1", "--wrap", "srun -n1 true")
    gpu_step = call("sbatch", "--parsable", "--job-name", "run", "--wrap", "srun --gpus=1 true")
    failed = call("sbatch", "--parsable", "--job-name", "run", "--wrap", "exit 3")
    ids = [ok.stdout.strip(), gpu_step.stdout.strip(), failed.stdout.strip()]
    states = call("sacct", "-X", "--parsable2", "--noheader", "--format=JobIdRaw,State", "--name", "run").stdout
    assert states.split() == [f"{ids[0]}|COMPLETED", f"{ids[1]}|FAILED", f"{ids[2]}|FAILED"]
    outside, step, gpu_step = jsonl(tmp_path / "cluster" / "srun.jsonl")
    assert outside["error"] and step["error"] is None
    assert "Invalid generic resource" in gpu_step["error"]  # the step asked for a GPU its job did not get
    assert len(jsonl(tmp_path / "cluster" / "sbatch.jsonl")) == 8  # every call recorded, refused ones too
