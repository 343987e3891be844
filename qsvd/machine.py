"""The machine a timing ran on: what it is, and what it can do at most.

`describe_machine` records the CPU (model, torch's instruction-set capability, VNNI / AMX / BF16 flags, threads) or
the GPU, the load average and the software versions. `Roofline` measures, once per process, the achievable memory
bandwidth (a large tensor copy: read + write) and matmul throughput (a large square matmul per precision, measured
on first use), the two ceilings a decode step is set against (`qsvd.stages.benchmark`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
GIB = 2**30


def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; what platform knows (no flags) elsewhere."""
    name, flags = None, []
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown", flags


def describe_machine(device: torch.device) -> dict:
    """Where the figures come from: CPU model and ISA (or the GPU), threads, load, software."""
    import transformers

    name, flags = _cpuinfo()
    machine = {
        "device": str(device),
        "cpu": name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "vnni": any("vnni" in flag for flag in flags),
        "amx": any(flag.startswith("amx") for flag in flags),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        machine.update(gpu=properties.name, gpu_memory_bytes=properties.total_memory, cuda_version=torch.version.cuda)
    return machine


def machine_line(machine: dict) -> str:
    """One line naming the machine, for tables."""
    if machine.get("gpu"):
        return f"{machine['gpu']} (CUDA {machine.get('cuda_version')}), torch {machine['torch_version']}"
    isa = ", ".join(machine["cpu_flags"]) or "no VNNI/AMX flags"
    return (f"{machine['cpu']} ({machine['cpu_capability']}; {isa}), {machine['threads']} threads, "
            f"torch {machine['torch_version']}, transformers {machine['transformers_version']}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(function, device: torch.device, repeats: int) -> float:
    function()  # warm-up: allocation, kernel selection
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PEAK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


@dataclass
class Roofline:
    """The machine's measured ceilings on `device`: memory bandwidth (bytes/s) and matmul throughput per precision
    (operations/s; "int8" is torch._int_mm). Sizes default to beyond the CPU's caches (or a GPU's L2)."""

    device: torch.device
    copy_bytes: int | None = None
    matmul_size: int | None = None
    repeats: int = 5
    bandwidth: float = field(init=False)
    peaks: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        gpu = self.device.type == "cuda"
        self.copy_bytes = self.copy_bytes or (GIB if gpu else GIB // 4)
        self.matmul_size = self.matmul_size or (8192 if gpu else 1024)
        source = torch.ones(self.copy_bytes // 4, dtype=torch.float32, device=self.device)
        target = torch.empty_like(source)
        seconds = _median_seconds(lambda: target.copy_(source), self.device, self.repeats)
        self.bandwidth = 2 * source.nbytes / seconds  # every byte read once and written once
        del source, target

    def peak(self, precision: str) -> float:
        """Operations/s of an n×n×n matmul in `precision` (float32, bfloat16, float16, int8), measured once."""
        if precision not in self.peaks:
            n, dtype = self.matmul_size, PEAK_DTYPES[precision]
            if dtype == torch.int8:
                a = torch.randint(-128, 128, (n, n), dtype=dtype, device=self.device)
                b = torch.randint(-128, 128, (n, n), dtype=dtype, device=self.device).t()  # the fast [N, K] layout
                function = lambda: torch._int_mm(a, b)  # noqa: E731
            else:
                a = torch.randn(n, n, dtype=dtype, device=self.device)
                b = torch.randn(n, n, dtype=dtype, device=self.device)
                function = lambda: a @ b  # noqa: E731
            self.peaks[precision] = 2 * n**3 / _median_seconds(function, self.device, max(2, self.repeats // 2))
        return self.peaks[precision]

    def record(self) -> dict:
        return {"bandwidth_bytes_per_s": self.bandwidth, "copy_bytes": self.copy_bytes, "matmul_size": self.matmul_size,
                "matmul_ops_per_s": dict(self.peaks)}
