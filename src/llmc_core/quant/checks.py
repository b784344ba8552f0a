"""Checks that a quantization spec fits a model, run right after the model loads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmc_core.errors import LlmcError

CANDIDATE_GROUP_SIZES = (16, 32, 64, 128, 256)


def check_divisible(spec: Any, linears: Mapping[str, Any]) -> None:
    """Fail with one clear line if ``spec.group_size`` does not divide every layer's input size
    (``per_block``: if the block does not tile every weight)."""
    if spec.granularity == "per_block":
        r, c = spec.block_size
        bad = [(n, lin.out_features, lin.in_features) for n, lin in linears.items() if lin.out_features % r or lin.in_features % c]
        if bad:
            n, o, i = bad[0]
            more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
            raise LlmcError(f"quant.weight.block_size: [{r}, {c}] does not tile layer {n} ({o} x {i}){more}. Choose a block size that divides every layer's output and input sizes, or granularity: per_channel.")
        return
    if spec.granularity != "per_group":
        return
    sizes = {name: lin.in_features for name, lin in linears.items()}
    bad = [(n, k) for n, k in sizes.items() if k % spec.group_size]
    if not bad:
        return
    fits = [g for g in CANDIDATE_GROUP_SIZES if all(k % g == 0 for k in sizes.values())]
    name, k = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    hint = f"Group sizes that fit every layer: {', '.join(map(str, fits))}." if fits else "No power-of-two group size from 16 to 256 fits every layer; use granularity: per_channel."
    raise LlmcError(
        f"quant.weight.group_size: {spec.group_size} does not divide the input size {k} of layer {name}{more}. "
        f"{hint} Set quant.weight.group_size to one of them."
    )
