"""What ``search_dtype: auto`` (AWQ) and ``forward_dtype: auto`` (GPTQ) pick: a lower precision only where the device runs it fast.

A bfloat16 matmul is the fast path on CUDA GPUs with bf16 support and on CPUs with AVX512-BF16 or
AMX; on a CPU without them (AVX2 only) PyTorch emulates it, about 44x slower than float32 on the
machine this was measured on. So ``auto`` asks the device: Linux CPUs by their ``/proc/cpuinfo``
flags, other CPUs by timing one small matmul in each dtype (once per process, cached).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("llmc.precision")

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The bf16 flags ``/proc/cpuinfo`` lists (None when there is no such file: not Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.is_file():
            return None
        cpuinfo = path.read_text(encoding="utf-8", errors="replace")
    words = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            words.update(line.split(":", 1)[-1].split())
    return {f for f in BF16_CPU_FLAGS if f in words}


def _matmul_seconds(dtype: Any, n: int = 256, reps: int = 3) -> float:
    import torch

    a = torch.randn(n, n).to(dtype)
    a @ a  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        a @ a
    return time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def fast_bf16(device_type: str, device_index: int | None = None) -> tuple[bool, str]:
    """Whether bfloat16 matmuls are fast on this device, and why (for the log)."""
    import torch

    if device_type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device_index)
        return ok, f"{name} {'supports' if ok else 'lacks'} bf16"
    if device_type != "cpu":
        return False, f"{device_type} device: not measured, float32 is the safe choice"
    flags = cpu_bf16_flags()
    if flags is not None:
        return bool(flags), f"CPU flags: {', '.join(sorted(flags))}" if flags else "CPU without avx512_bf16/amx_bf16"
    fp32, bf16 = _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    return bf16 < fp32, f"timed a 256x256 matmul: bf16 {bf16 * 1e3:.1f} ms, fp32 {fp32 * 1e3:.1f} ms"


def auto_search_dtype(model_dtype: Any, device: Any, key: str = "search_dtype") -> Any:
    """``search_dtype: auto`` (or GPTQ's ``forward_dtype``, named by ``key``): the model's dtype for
    fp16/bf16 models; for float32 models bfloat16 where the device runs it fast, float32
    otherwise. Logs the choice once per device and key."""
    import torch

    if model_dtype != torch.float32:
        return model_dtype
    device = torch.device(device)
    ok, why = fast_bf16(device.type, device.index)
    chosen = torch.bfloat16 if ok else torch.float32
    _log_once(key, device.type, str(chosen).replace("torch.", ""), why)
    return chosen


@functools.lru_cache(maxsize=None)
def _log_once(key: str, device_type: str, chosen: str, why: str) -> None:
    log.info("%s auto: %s on %s (%s)", key, chosen, device_type, why)
