"""Triton kernels (CUDA only). Nothing here imports triton until a kernel is called.

- :func:`available`: whether :class:`~llmc_core.quant.qlinear.QuantLinear` may use the kernels
  (CUDA present, ``triton`` importable, ``LLMC_DISABLE_TRITON`` not set to 1).
- :func:`w4a16_matmul`: ``x @ dequant(qweight)`` for AWQ GEMM tensors (see :mod:`.w4a16`).

Install the optional dependency with ``pip install 'llmc[kernels]'``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """True when the Triton W4A16 path can run here."""
    if os.environ.get("LLMC_DISABLE_TRITON") == "1" or not _triton_importable():
        return False
    import torch

    return torch.cuda.is_available()


def w4a16_matmul(x: Any, qweight: Any, qzeros: Any, scales: Any, group_size: int, config: Any = None) -> Any:
    """``x [M, K] (fp16/bf16) @ W [K, N]`` with ``W`` given as AWQ GEMM tensors; see :mod:`.w4a16`."""
    from llmc_core.quant.kernels.w4a16 import w4a16_matmul as run

    return run(x, qweight, qzeros, scales, group_size, config)
