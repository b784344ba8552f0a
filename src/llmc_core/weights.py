"""What a run quantizes: counted by kind before any work, listed with the skipped ones after.

A method that would quantize nothing is refused before any work (a family whose weights llmc
cannot find would otherwise run to the end and save a float model as "quantized").
"""

from __future__ import annotations

import logging
from typing import Any

from llmc_core.errors import LlmcError

log = logging.getLogger("llmc")


def announce_weights(adapter: Any, method: str) -> dict[str, int]:
    """Log how many weights ``method`` will quantize, by kind (attention, MLP, experts); raise
    :class:`LlmcError` when there are none. Returns the counts."""
    counts, skipped = adapter.inventory()
    total = sum(counts.values())
    if not total:
        raise LlmcError(
            f"quant.method: {method} would quantize nothing: llmc found no linear layer or fused expert tensor in the decoder blocks "
            f"({adapter.blocks_path}) of this model. Check model.type (auto picks the family from config.json)."
        )
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    log.info("%s will quantize %d weights (%s); %d stay float", method, total, kinds, len(skipped))
    return counts


def weight_report(adapter: Any, quantized: set[str]) -> tuple[dict[str, int], dict[str, str]]:
    """After the run: ``({kind: quantized count}, {name: why it was not quantized})``. A weight
    the adapter lists as quantizable that the method did not quantize is reported as skipped."""
    counts: dict[str, int] = {}
    _, skipped = adapter.inventory()
    for i, block in enumerate(adapter.blocks()):
        prefix = adapter.block_prefix(i)
        for name in adapter.quant_linears(block):
            full = f"{prefix}.{name}"
            if full in quantized:
                counts[adapter.kind(name)] = counts.get(adapter.kind(name), 0) + 1
            else:
                skipped[full] = "left float by the method"
    return counts, skipped


def int4_layer_problem(adapter: Any, where: str) -> str | None:
    """Why the model cannot be packed as AutoAWQ GEMM int4 ``nn.Linear`` layers (``where``:
    ``save.save_awq`` or ``eval.eval_pos: real_quant``), or None when it can."""
    import torch

    for i, block in enumerate(adapter.blocks()):
        fused = [n for n, w in adapter.quant_linears(block).items() if not isinstance(w, torch.nn.Linear)]
        if fused:
            return (
                f"{where}: this model keeps its MoE experts as fused 3-D tensors ({adapter.block_prefix(i)}.{fused[0]} and {len(fused) - 1} more), "
                "which the AutoAWQ GEMM format (one packed nn.Linear per layer) cannot hold. Save the fake-quantized model with save.save_fake "
                "(and measure fake_quant) instead."
            )
    return None
