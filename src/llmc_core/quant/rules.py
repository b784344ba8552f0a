"""Format rules: which weight specs each packed format can hold, and the config entry that marks it.

Low in the stack (no torch, no file writing), so config validation, savers, the packing code and
the format writers all ask the same function and the imports go one way:
``rules`` ← ``pack`` ← ``qlinear`` ← ``awq_format``.
"""

from __future__ import annotations

from typing import Any


SIGNED_SCALE = "the weights are quantized with signed scales (quant.weight.signed_scale, the grid save_gguf sets for Q4_0 / Q5_0 / Q8_0), which only GGUF stores; save this format from a run without save_gguf"
FLOAT_MIN = "the weights are quantized with float16 mins (quant.weight.zero_dtype: float16, the grid save_gguf sets for Q4_1 / Q5_1), which only GGUF stores; save this format from a run without save_gguf"


def gguf_grid_problems(spec: Any) -> list[str]:
    """Why a weight spec on one of GGUF's own grids cannot be stored by a format of integer zero points and positive scales."""
    return [SIGNED_SCALE] if getattr(spec, "signed_scale", False) else [FLOAT_MIN] if getattr(spec, "zero_dtype", "int") == "float16" else []


def awq_problems(bit: int, granularity: str, group_size: int | None) -> list[str]:
    """Why a weight spec cannot be written in the AWQ GEMM layout (empty list: it can).

    Symmetric specs can: their codes are stored with zero point 8 (AutoAWQ's ``zero_point:
    false`` has no GEMM checkpoint form, so llmc never writes it).
    """
    out = []
    if bit != 4:
        out.append(f"the AWQ GEMM format holds 4-bit weights only (quant.weight.bit is {bit})")
    if granularity != "per_group":
        out.append(f"the AWQ GEMM format holds per-group scales only (quant.weight.granularity is {granularity}); use per_group with group_size 128 (or 64)")
    return out


def awq_quantization_config(group_size: int, not_converted: list[str]) -> dict[str, Any]:
    """The ``config.json`` entry that marks an AWQ GEMM checkpoint."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm", "modules_to_not_convert": not_converted}


def real_quant_problems(scheme: Any) -> list[str]:
    """Why llmc has no real-quantized kernel for ``scheme`` (empty list: ``real_quant`` can run it).

    ``real_quant`` runs packed int4 weights (W4A16 per-group: the Triton kernel on CUDA, the torch
    reference elsewhere) and 8-bit weights with 8-bit activations (INT8 W8A8 through
    ``torch._int_mm``, FP8 through ``torch._scaled_mm``; :mod:`llmc_core.quant.w8a8`); other
    schemes are measured at ``fake_quant``.
    """
    w = scheme.weight
    if gguf_grid_problems(w):
        return gguf_grid_problems(w)
    if scheme.weight_only and not w.is_float:
        return awq_problems(w.bit, w.granularity, w.group_size)
    if scheme.act is not None and w.num_bits == 8 and scheme.act.num_bits == 8:
        from llmc_core.quant.w8a8 import w8a8_problems

        return w8a8_problems(scheme)
    return [f"llmc's real-quantized layers run W4A16 integer weights and INT8 / FP8 W8A8, not {scheme.describe()}"]
