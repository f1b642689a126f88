"""Peak FLOP/s of one device: the denominator of MFU.

GPUs: NVIDIA's published dense numbers (half the "with sparsity" figure), looked up by the name
`torch.cuda.get_device_name()` reports, as torchtitan's `get_peak_flops` does. The bf16 column is
the peak for every dtype except float8 (torchtitan's convention), so MFU stays comparable.
CPUs have no table: a square matmul benchmark measures the peak once per (CPU model, threads,
dtype) and caches it in `<cache_dir>/cpu_peak_flops.json`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from typing import NamedTuple, Optional

import torch
from filelock import FileLock

from pretrain.log import logger

CPU_CACHE_FILE = "cpu_peak_flops.json"
_FLOAT8 = {d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2")) if d is not None}


class GpuPeak(NamedTuple):
    key: str  # whole-word substring of torch.cuda.get_device_name()
    label: str  # human name for the log line
    bf16: float  # dense bf16/fp16 tensor-core FLOP/s
    fp8: Optional[float]  # dense fp8 tensor-core FLOP/s; None = no fp8 tensor cores


# Order matters: the first whole-word match wins, so variants come before their family name.
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak("H100 NVL", "H100 NVL", 835e12, 1671e12),
    GpuPeak("H100 PCIe", "H100 PCIe", 756e12, 1513e12),
    GpuPeak("H100", "H100 SXM", 989.5e12, 1979e12),  # "NVIDIA H100 80GB HBM3" is the SXM part
    GpuPeak("H200 NVL", "H200 NVL", 835e12, 1671e12),
    GpuPeak("GH200", "GH200", 989.5e12, 1979e12),
    GpuPeak("H200", "H200", 989.5e12, 1979e12),
    GpuPeak("B200", "B200", 2.25e15, 4.5e15),
    GpuPeak("A100", "A100", 312e12, None),
    GpuPeak("L40S", "L40S", 362.05e12, 724.1e12),
    GpuPeak("L4", "L4", 121e12, 242e12),  # whole word: an "L40" does not match
    GpuPeak("A10G", "A10G", 125e12, None),  # the A10 datasheet value; AWS publishes none for A10G
)
FALLBACK = GPU_PEAKS[2]  # H100 SXM


def find_gpu(name: str) -> Optional[GpuPeak]:
    """The table row for a CUDA device name, or None when the GPU is not in the table."""
    for row in GPU_PEAKS:
        if re.search(rf"(?<![\w-]){re.escape(row.key)}(?!\w)", name):
            return row
    return None


def peak_flops_for_name(name: str, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, description) for a GPU name; unknown names fall back to H100 SXM, said in the text."""
    row = find_gpu(name)
    warning = ""
    if row is None:
        row = FALLBACK
        warning = f"WARNING: {name!r} is not in the peak table, assuming {row.label}; MFU is only indicative. "
    if dtype in _FLOAT8:
        if row.fp8 is None:
            return row.bf16, f"{warning}{row.label} has no fp8 tensor cores: bf16 dense table value"
        return row.fp8, f"{warning}{row.label} fp8 dense table value"
    return row.bf16, f"{warning}{row.label} bf16 dense table value"


def cpu_model_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def measure_cpu_matmul_flops(dtype: torch.dtype, seconds: float = 1.0, repeats: int = 10, n: int = 1024) -> float:
    """Best-of-`repeats` FLOP/s of an n x n @ n x n matmul, about `seconds` in all, current thread count.
    The best of many short tries, so a moment of contention from another process does not lower it."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, packing buffers
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    one = max(time.perf_counter() - start, 1e-6)
    iters = max(1, int(seconds / repeats / one))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best


def cpu_peak_flops(dtype: torch.dtype, cache_dir: str) -> tuple[float, str]:
    """Measured CPU matmul FLOP/s, read from the cache when this CPU/threads/dtype was measured before."""
    path = os.path.join(os.path.expanduser(cache_dir), CPU_CACHE_FILE)
    threads = torch.get_num_threads()
    dtype_name = str(dtype).removeprefix("torch.")
    key = f"{cpu_model_name()} | threads={threads} | {dtype_name}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # one process measures while the others wait for its result: ranks measuring at once share cores
    with FileLock(path + ".lock"):
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}  # missing or unreadable: measure and rewrite
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("flops", 0) > 0:
            flops = float(entry["flops"])
            return (
                flops,
                f"CPU measured {dtype_name} matmul, {threads} threads: {flops / 1e12:.3g} TFLOP/s (cached in {path})",
            )
        flops = measure_cpu_matmul_flops(dtype)
        cache[key] = {"flops": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    return (
        flops,
        f"CPU measured {dtype_name} matmul, {threads} threads: {flops / 1e12:.3g} TFLOP/s (now cached in {path})",
    )


def peak_flops(device: torch.device, dtype: torch.dtype, cache_dir: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained) for the MFU denominator."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops, text = peak_flops_for_name(name, dtype)
        if find_gpu(name) is None:
            logger.warning(text)
        return flops, text
    if device.type == "cpu":
        return cpu_peak_flops(dtype, cache_dir)
    raise ValueError(f"peak_flops: no peak known for device type {device.type!r} (cpu and cuda are supported)")
