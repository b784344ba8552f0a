"""Input capture and the block loop with offloading.

Only the current decoder block (and, during capture, the embedding) sits on the compute device;
the rest of the model stays where it was loaded (CPU). Peak device memory is therefore about one
block plus the cached activations, so models larger than the device can be calibrated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from llmc_core.adapters import ModelAdapter
from llmc_core.errors import LlmcError
from llmc_core.memory import release_heap


# A block forward takes at most this many tokens in one call; samples are independent, so the
# slicing changes nothing but memory and speed. A SmolLM2 block on 128 x 512 tokens, on a 2-core
# Xeon: 2.80 s in slices of 16384 tokens, 2.44 s in slices of 4096, 2.42 s of 2048.
FORWARD_TOKENS = 4096


class _Captured(Exception):
    """Raised by the last catcher to stop the forward pass once every block's inputs are recorded."""


class BlockKwargs(list):
    """Block 0's keyword inputs, one dict per batch, plus ``by_block``: those of later blocks
    that receive different ones (Gemma's local and global layers get their own rotary
    embeddings and masks)."""

    by_block: dict[int, list[dict[str, Any]]]

    def for_block(self, index: int) -> list[dict[str, Any]]:
        return self.by_block.get(index, self)


def kwargs_for(kwargs: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """The keyword inputs of block ``index`` (block 0's unless the capture recorded others)."""
    return kwargs.for_block(index) if isinstance(kwargs, BlockKwargs) else kwargs


class _Catcher(torch.nn.Module):
    """Records a block's inputs and passes the hidden states through unchanged, or (``stop``)
    ends the forward pass; only block 0's hidden states are real, the others' keyword inputs are."""

    def __init__(self, block: torch.nn.Module, sink: list[tuple[torch.Tensor, dict[str, Any]]], stop: bool = True):
        super().__init__()
        self.block = block
        self.sink = sink
        self.stop = stop
        # Decoder stacks sometimes read attributes of their layers (e.g. ``attention_type``).
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise LlmcError("The decoder block got positional arguments besides hidden_states; this model family needs its own adapter.")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache", "use_cache")}
        self.sink.append((hidden_states, kwargs))
        if self.stop:
            raise _Captured
        return hidden_states


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
    # With ``quant_out`` the run discards those of ``transform_block`` (the float block's), and
    # ``quantize_block`` may set the quantized block's.
    outputs: list[torch.Tensor] = field(default_factory=list)
    # ``quant.quant_out``: quantize_block runs right after transform_block in this pass, and the
    # next block's inputs are the quantized block's outputs.
    quant_out: bool = False

    def forward(self, inputs: list[torch.Tensor] | None = None, kwargs: list[dict[str, Any]] | None = None) -> list[torch.Tensor]:
        """Run the block on ``inputs`` and ``kwargs`` (default: its cached ones), one batch at a
        time, and a batch of more than ``FORWARD_TOKENS`` tokens in slices of whole samples: the
        activations of one call (MLP intermediates, attention scores) grow with the tokens in
        it, and ``calib.bs: -1`` puts every calibration sample in one batch."""
        outs = []
        for h, kw in zip(inputs or self.inputs, kwargs or self.kwargs):
            outs.append(join_parts(h.shape[0], (first_tensor(self.block(*a, **k)) for a, k in split_call((h,), kw))))
        return outs


def split_call(args: tuple, kwargs: dict[str, Any], max_tokens: int | None = None, size: int | None = None) -> Iterator[tuple[tuple, dict[str, Any]]]:
    """One module call on a batch as calls on consecutive slices of whole samples: ``size``
    samples each, or as many as hold ``max_tokens`` tokens (default :data:`FORWARD_TOKENS`). The
    hidden states are ``args[0]`` (or ``hidden_states=``); every tensor cut is cut as
    :func:`cut_batch` says. The call is yielded whole when it fits."""
    x = hidden_of(args, kwargs)
    n = x.shape[0]
    if size is None:
        per_sample = max(1, x[0].numel() // max(1, x.shape[-1]))
        size = max(1, (FORWARD_TOKENS if max_tokens is None else max_tokens) // per_sample)
    if size >= n:
        yield args, kwargs
        return
    for i in range(0, n, size):
        part = slice(i, i + size)
        yield tuple(cut_batch(a, n, part) for a in args), {k: cut_batch(v, n, part) for k, v in kwargs.items()}


def join_parts(n: int, parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """The outputs of :func:`split_call`'s calls (consecutive slices of ``n`` samples) as one
    batch, written into one tensor as they come: ``torch.cat`` of the parts would hold the batch
    twice."""
    out, at = None, 0
    for part in parts:
        if out is None:
            out = part if part.shape[0] == n else part.new_empty((n, *part.shape[1:]))
        if out is not part:
            out[at : at + part.shape[0]] = part
        at += part.shape[0]
    if out is None or at != n:
        raise LlmcError(f"A block call in slices returned {at} of its {n} samples; this model family needs its own adapter.")
    return out


def first_tensor(out: Any) -> torch.Tensor:
    """The output tensor of a module call: decoder blocks return a tensor (transformers 5) or a
    tuple whose first item is one, attention modules a tuple ``(output, weights, ...)``."""
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


def hidden_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden-state input of a module call (first positional, or ``hidden_states=``)."""
    return args[0] if args else kwargs.get("hidden_states", next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))


def cut_batch(v: Any, n: int, part: slice) -> Any:
    """``v[part]`` for tensors of two or more dimensions (also inside tuples and lists) whose first
    dimension is the batch size ``n``; anything else is passed whole: position embeddings shared
    by the batch (``[1, seq, d]``) and one-dimensional per-position inputs (``cache_position``,
    ``[seq]``, which a batch of ``seq`` samples must not cut)."""
    if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == n:
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
    """Run the model up to block 0 on each batch; return block 0's inputs and keyword inputs
    (a :class:`BlockKwargs`: later blocks' keyword inputs where they differ from block 0's)."""
    blocks_parent = model.get_submodule(adapter.blocks_path)
    originals = list(blocks_parent)
    sinks: list[list[tuple[torch.Tensor, dict[str, Any]]]] = [[] for _ in originals]
    pre = adapter.pre_block_modules()
    homes = [_device_of(m) for m in pre]
    for m in pre:
        m.to(device)
    # Every block becomes a catcher that records its inputs and passes the hidden states through
    # unchanged (no block computes anything); the last one stops the pass before the head.
    last = len(originals) - 1
    for i, block in enumerate(originals):
        blocks_parent[i] = _Catcher(block, sinks[i], stop=i == last)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks_parent[i] = block
        for m, home in zip(pre, homes):
            m.to(home)
    kwargs = BlockKwargs(kw for _, kw in sinks[0])
    kwargs.by_block = {}
    for i in range(1, len(originals)):
        mine = [kw for _, kw in sinks[i]]
        if any(not _same_values(a, b) for a, b in zip(mine, kwargs)):
            kwargs.by_block[i] = mine
    return [h for h, _ in sinks[0]], kwargs


def _same_values(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two keyword dicts hold the very same objects (a model hands every layer of one
    type the same mask and position embeddings)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            if len(x) != len(y) or any(p is not q for p, q in zip(x, y)):
                return False
        elif x is not y:
            return False
    return True


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
    step: str = "transform",
    quant_out: bool = False,
) -> list[torch.Tensor]:
    """Process blocks in order: move block i to ``device``, call ``work(ctx)``, check its weights,
    compute its outputs unless ``work`` set them (the next block's inputs, ``ctx.outputs``), call ``after(ctx)`` and move
    the block back. Returns the last outputs. ``start``: skip the blocks before it (a resumed run);
    ``inputs`` are then block ``start``'s inputs (empty for a pass that needs none, such as the
    quantize pass: every block then has no inputs and no outputs). ``step``: what ``work`` does,
    for the error that names a block left with NaN/inf weights. ``quant_out``: handed to each
    context (``ctx.quant_out``).

    ``inputs`` is consumed: the list is emptied, so a caller that still holds it does not keep
    block ``start``'s inputs alive (on the device) while the later blocks run."""
    inputs, given = list(inputs), inputs
    given.clear()
    blocks = adapter.blocks()
    for i in progress(range(start, len(blocks))):
        block = blocks[i]
        home = _device_of(block)
        block.to(device)
        ctx = BlockContext(i, block, adapter.block_prefix(i), adapter, inputs, kwargs_for(kwargs, i), device, quant_out=quant_out)
        if work is not None:
            work(ctx)
            check_finite_weights(ctx, step)
        outputs = ctx.outputs or ctx.forward()
        _check_finite(outputs, ctx)
        ctx.outputs = outputs
        if after is not None:
            after(ctx)
        block.to(home)
        inputs = outputs
        del ctx
        release_heap()  # the block's activations, freed in pieces the C heap would otherwise keep
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
