"""A one-node SLURM stand-in for running the SLURM executor plugin without a cluster.

The commands in this folder (sbatch, srun, squeue, sacct, scontrol, sinfo, sacctmgr, sshare,
scancel) answer exactly the calls and output formats that snakemake-executor-plugin-slurm 2.8
and its jobstep plugin make (see their __init__.py, submit_string.py, job_status_query.py,
accounts.py, partitions.py, utils.py). Put the folder first on PATH and point
QSVD_SLURM_STANDIN_DIR at an empty directory, which holds the cluster's state:

    sbatch.jsonl   one line per sbatch call: {"jobid", "argv", "cwd", "error", "options"}: the full
                   command line and, when accepted, each option's value ({long name: last value,
                   "" for a flag}); when rejected, jobid is null and error says why
    srun.jsonl     one line per srun call: {"jobid", "argv", "error", "options", "command"}
    jobs/<id>.json one record per job: name, comment, account, partition, cpus, gpus, state, exit code

sbatch checks its options like the real one (unknown options, malformed values, unknown
account or partition, script arguments with --wrap are errors), then runs the job here and
now (synchronously, in its --chdir, with --output/--error, the SLURM_* variables a job sees
and a wall-clock limit from --time) and prints the job id; sacct and squeue then report it
COMPLETED, FAILED or TIMEOUT. A job that requests no GPU gets CUDA_VISIBLE_DEVICES="" (SLURM's
cgroups hide the node's GPUs from it); srun refuses a step asking for more GPUs or CPUs than
its allocation has. Standard library only: the commands run under any python3.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

STATE_VARIABLE = "QSVD_SLURM_STANDIN_DIR"
CLUSTER = "standin"
ACCOUNTS = ("qsvd-test",)
PARTITIONS = {"main": {"default": True, "cpus": 64, "gpus": 8, "max_minutes": None}}
MIN_JOB_AGE_SECONDS = 300
MAX_ARRAY_SIZE = 1001
FINISHED = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL")


class UsageError(Exception):
    """A command line the real command would refuse; the message is what it would print."""


def fail(command: str, message: str, code: int = 1):
    print(f"{command}: error: {message}", file=sys.stderr)
    sys.exit(code)


def state_dir(command: str) -> Path:
    value = os.environ.get(STATE_VARIABLE)
    if not value:
        fail(command, f"{STATE_VARIABLE} is not set: point it at a directory for the stand-in cluster's state")
    path = Path(value)
    (path / "jobs").mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(state: Path):
    with open(state / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_line(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps(record) + "\n")


def next_job_id(state: Path) -> int:
    with locked(state):
        counter = state / "last_jobid"
        jobid = int(counter.read_text()) + 1 if counter.exists() else 1000
        counter.write_text(str(jobid))
    return jobid


def write_job(state: Path, record: dict) -> None:
    path = state / "jobs" / f"{record['jobid']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def read_job(state: Path, jobid) -> dict | None:
    path = state / "jobs" / f"{jobid}.json"
    return json.loads(path.read_text()) if path.exists() else None


def all_jobs(state: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (state / "jobs").glob("*.json")), key=lambda j: j["jobid"])


def user() -> str:
    return getpass.getuser()


def host() -> str:
    return socket.gethostname()


def default_partition() -> str:
    return next(name for name, spec in PARTITIONS.items() if spec["default"])


def parse_options(argv: list[str], options: dict[str, tuple[str | None, str]],
                  stop_at_positional: bool) -> tuple[dict[str, list[str]], list[str]]:
    """getopt_long-style parsing: `--name=value`, `--name value`, `-Xvalue`, `-X value`, `-abc`.

    `options` maps each long name to (short letter or None, kind) with kind "flag", "value" or
    "optional" (a value only as `--name=value`). Returns ({long name: [values...]}, positionals).
    An unknown option is a UsageError, as it is for the real command.
    """
    by_short = {short: name for name, (short, _) in options.items() if short}
    seen: dict[str, list[str]] = {}
    positionals: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positionals += argv[i + 1:]
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name not in options:
                raise UsageError(f"unrecognized option '--{name}'")
            kind = options[name][1]
            if kind == "flag":
                if eq:
                    raise UsageError(f"option '--{name}' doesn't allow an argument")
                seen.setdefault(name, []).append("")
            elif kind == "optional":
                seen.setdefault(name, []).append(value)
            else:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"option '--{name}' requires an argument")
                    value = argv[i]
                seen.setdefault(name, []).append(value)
        elif arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            while letters:
                letter, letters = letters[0], letters[1:]
                if letter not in by_short:
                    raise UsageError(f"invalid option -- '{letter}'")
                name = by_short[letter]
                if options[name][1] == "flag":
                    seen.setdefault(name, []).append("")
                    continue
                if not letters:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"option requires an argument -- '{letter}'")
                    letters = argv[i]
                seen.setdefault(name, []).append(letters)
                letters = ""
        else:
            if stop_at_positional:
                positionals += argv[i:]
                break
            positionals.append(arg)
        i += 1
    return seen, positionals


def last(options: dict[str, list[str]], name: str) -> str | None:
    """The value a repeated option ends up with: the last one, as with the real commands."""
    return options[name][-1] if name in options else None


TIME_PATTERNS = [  # SLURM's --time formats, as (regex, seconds from the groups)
    (r"(\d+)", lambda m: int(m[0]) * 60),
    (r"(\d+):(\d+)", lambda m: int(m[0]) * 60 + int(m[1])),
    (r"(\d+):(\d+):(\d+)", lambda m: int(m[0]) * 3600 + int(m[1]) * 60 + int(m[2])),
    (r"(\d+)-(\d+)", lambda m: int(m[0]) * 86400 + int(m[1]) * 3600),
    (r"(\d+)-(\d+):(\d+)", lambda m: int(m[0]) * 86400 + int(m[1]) * 3600 + int(m[2]) * 60),
    (r"(\d+)-(\d+):(\d+):(\d+)", lambda m: int(m[0]) * 86400 + int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])),
]


def time_limit_seconds(value: str) -> int | None:
    """Seconds of a --time value; None for UNLIMITED/INFINITE."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    for pattern, seconds in TIME_PATTERNS:
        match = re.fullmatch(pattern, value)
        if match:
            return seconds(match.groups())
    raise UsageError(f"Invalid time limit specification: '{value}'")


def memory_mb(value: str, option: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)", value, re.IGNORECASE)
    if not match:
        raise UsageError(f"invalid memory constraint {value!r} for --{option}")
    factor = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[match[2].upper()]
    return max(1, int(int(match[1]) * factor))


def positive_int(value: str, option: str) -> int:
    if not re.fullmatch(r"\d+", value) or int(value) < 1:
        raise UsageError(f"invalid --{option} argument {value!r}: a positive integer is required")
    return int(value)


def gpu_count(value: str, option: str) -> int:
    """GPUs of `--gpus [type:]N` or of the gpu entries of `--gres name[:type][:N],...`."""
    if option == "gpus":
        match = re.fullmatch(r"(?:[A-Za-z0-9_.]+:)?(\d+)", value)
        if not match:
            raise UsageError(f"Invalid --gpus specification: '{value}'")
        return int(match[1])
    total = 0
    for entry in value.split(","):
        match = re.fullmatch(r"([A-Za-z0-9_]+)(?::([A-Za-z0-9_.]+))?(?::(\d+)[KMGT]?)?", entry)
        if not match:
            raise UsageError(f"Invalid generic resource (gres) specification: '{entry}'")
        if match[1] == "gpu":
            count = match[3] or (match[2] if match[2] and match[2].isdigit() else "1")
            total += int(count)
    return total


def format_width(field: str) -> tuple[str, int | None]:
    """`Account%256` -> ("account", 256); sacct/sshare/sacctmgr field syntax."""
    name, _, width = field.partition("%")
    return name.lower(), (abs(int(width)) if width.lstrip("-").isdigit() else None)
