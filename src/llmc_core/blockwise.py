"""Input capture and the block loop with offloading.

Only the current decoder block (and, during capture, the embedding) sits on the compute device;
the rest of the model stays where it was loaded (CPU). Peak device memory is therefore about one
block plus the cached activations, so models larger than the device can be calibrated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmc_core.adapters import ModelAdapter
from llmc_core.errors import LlmcError


class _Captured(Exception):
    """Raised by the catcher to stop the forward pass once block 0's inputs are recorded."""


class _Catcher(torch.nn.Module):
    def __init__(self, block: torch.nn.Module, sink: list[tuple[torch.Tensor, dict[str, Any]]]):
        super().__init__()
        self.block = block
        self.sink = sink
        # Decoder stacks sometimes read attributes of their layers (e.g. ``attention_type``).
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise LlmcError("The decoder block got positional arguments besides hidden_states; this model family needs its own adapter.")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        self.sink.append((hidden_states, kwargs))
        raise _Captured


@dataclass
class BlockContext:
    """What a method sees of one block: the block, its inputs, and how to name its layers."""

    index: int
    block: torch.nn.Module
    prefix: str
    adapter: ModelAdapter
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    device: torch.device
    notes: dict[str, Any] = field(default_factory=dict)
    # The block's outputs on ``inputs``: a method's ``work`` may set them when it has computed them
    # for the block as it leaves ``work`` (saving a forward); otherwise run_blocks does before ``after``.
    outputs: list[torch.Tensor] = field(default_factory=list)

    def forward(self, inputs: list[torch.Tensor] | None = None, kwargs: list[dict[str, Any]] | None = None) -> list[torch.Tensor]:
        """Run the block on ``inputs`` and ``kwargs`` (default: its cached ones), one batch at a time."""
        return [block_output(self.block(h, **kw)) for h, kw in zip(inputs or self.inputs, kwargs or self.kwargs)]


def block_output(out: Any) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers 5) or a tuple whose first item is one."""
    return out[0] if isinstance(out, (tuple, list)) else out


def sub_batches(inputs: list[torch.Tensor], kwargs: list[dict[str, Any]], max_tokens: int) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[slice]]:
    """The first samples of the cached batches, up to ``max_tokens`` tokens (at least one sample):
    inputs, keyword inputs cut to match (tensors whose first dimension is the batch size), and the
    slice of each batch that was kept."""
    out_h, out_kw, kept = [], [], []
    left = max_tokens
    for h, kw in zip(inputs, kwargs):
        if left <= 0:
            break
        n = h.shape[0]
        take = min(n, max(1, left // h.shape[1]))
        out_h.append(h[:take])
        out_kw.append({k: cut_batch(v, n, slice(0, take)) for k, v in kw.items()})
        kept.append(slice(0, take))
        left -= take * h.shape[1]
    return out_h, out_kw, kept


def cut_batch(v: Any, n: int, part: slice) -> Any:
    """``v[part]`` for tensors (also inside tuples and lists) whose first dimension is the batch
    size ``n``; anything else (e.g. position embeddings shared by the batch) is passed whole."""
    if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n:
        return v[part]
    if isinstance(v, (tuple, list)):
        return type(v)(cut_batch(x, n, part) for x in v)
    return v


def move_kwargs(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, (tuple, list)):
            return type(v)(move(x) for x in v)
        return v

    return {k: move(v) for k, v in kwargs.items()}


@torch.no_grad()
def capture_block_inputs(model: torch.nn.Module, adapter: ModelAdapter, batches: Iterable[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run the model up to block 0 on each batch; return block 0's inputs and keyword inputs."""
    blocks_parent = model.get_submodule(adapter.blocks_path)
    first = blocks_parent[0]
    sink: list[tuple[torch.Tensor, dict[str, Any]]] = []
    pre = adapter.pre_block_modules()
    homes = [_device_of(m) for m in pre]
    for m in pre:
        m.to(device)
    blocks_parent[0] = _Catcher(first, sink)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        blocks_parent[0] = first
        for m, home in zip(pre, homes):
            m.to(home)
    return [h for h, _ in sink], [kw for _, kw in sink]


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def run_blocks(
    adapter: ModelAdapter,
    inputs: list[torch.Tensor],
    kwargs: list[dict[str, Any]],
    device: torch.device,
    work: Callable[[BlockContext], None] | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
    after: Callable[[BlockContext], None] | None = None,
    start: int = 0,
) -> list[torch.Tensor]:
    """Process blocks in order: move block i to ``device``, call ``work(ctx)``, check its weights,
    compute its outputs unless ``work`` set them (the next block's inputs, ``ctx.outputs``), call ``after(ctx)`` and move
    the block back. Returns the last outputs. ``start``: skip the blocks before it (a resumed run);
    ``inputs`` are then block ``start``'s inputs."""
    blocks = adapter.blocks()
    for i in progress(range(start, len(blocks))):
        block = blocks[i]
        home = _device_of(block)
        block.to(device)
        ctx = BlockContext(i, block, adapter.block_prefix(i), adapter, inputs, kwargs, device)
        if work is not None:
            work(ctx)
            check_finite_weights(ctx, "transform")
        outputs = ctx.outputs or ctx.forward()
        _check_finite(outputs, ctx)
        ctx.outputs = outputs
        if after is not None:
            after(ctx)
        block.to(home)
        inputs = outputs
    return inputs


def _check_finite(outputs: list[torch.Tensor], ctx: BlockContext) -> None:
    for out in outputs:
        if not torch.isfinite(out).all():
            raise LlmcError(f"Block {ctx.index} ({ctx.prefix}) produced NaN/inf activations. Try torch_dtype: float32 or bfloat16, or check the method's settings.")


def check_finite_weights(ctx: BlockContext, step: str) -> None:
    """Stop the run, naming block and layer, when a method's ``step`` left NaN/inf in a weight."""
    for layer, module in ctx.block.named_modules():
        bad = [n for n, p in module.named_parameters(recurse=False) if not torch.isfinite(p).all()]
        if bad:
            raise LlmcError(
                f"Block {ctx.index} ({ctx.prefix}) layer {layer or '(block)'} has NaN/inf weights ({', '.join(bad)}) after the method's {step}. "
                "Try torch_dtype: float32, or check the method's settings (e.g. scale search or clipping ranges)."
            )
