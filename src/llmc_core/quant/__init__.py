"""Quantizer math shared by every method: ``QuantSpec``, ``Scheme`` and the one implementation of
every format's (fake-)quantization (int, FP8, FP4; weights and activations).

``spec`` and ``checks`` are torch-free; ``fake`` needs torch and is imported on first use, so
validating a config never imports torch.
"""

from __future__ import annotations

from typing import Any

from llmc_core.quant.checks import check_divisible
from llmc_core.quant.spec import QuantSpec

_FAKE = ("QuantizedWeight", "codes_dtype", "column_qparams", "fake_quantize", "fake_quantize_act", "fake_quantize_linear", "global_scale", "group_view", "qparams", "quantize_columns", "quantize_grouped", "quantize_weight", "static_scale", "ungroup", "weight_range")

__all__ = ["QuantSpec", "check_divisible", *_FAKE]


def __getattr__(name: str) -> Any:
    if name in _FAKE:
        from llmc_core.quant import fake

        return getattr(fake, name)
    raise AttributeError(name)
