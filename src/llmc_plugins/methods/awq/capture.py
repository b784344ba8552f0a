"""Capturing what AWQ needs from one block forward: layer inputs, their statistics, module outputs.

Every capture runs the block on its cached inputs with forward hooks and stops the forward as soon
as it has what it needs (:class:`_Stop`), so a group near the top of the block costs a fraction of
a block forward. Statistics are reduced inside the hooks (``|x|`` sums, ``X^T X``), so the full
activations of a linear layer are never stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


class _Stop(Exception):
    """Raised from a hook to end a block forward once the capture is complete."""


def first_tensor(out: Any) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the output (attention)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def hooks(*handles: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_block(ctx: Any, on_batch: Callable[[int], None] | None = None) -> None:
    """Run ``ctx.block`` over every cached batch; a hook may end a batch early with :class:`_Stop`."""
    for i, (h, kw) in enumerate(zip(ctx.inputs, ctx.kwargs)):
        if on_batch is not None:
            on_batch(i)
        try:
            ctx.block(h, **kw)
        except _Stop:
            pass


@dataclass
class AbsMean:
    """Running per-channel mean of ``|x|`` over all tokens of all batches."""

    total: torch.Tensor | None = None
    count: int = 0

    def add(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        s = x2.abs().sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += x2.shape[0]
        return x2

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


@dataclass
class ModuleCapture:
    """Per batch: the inspect module's call (args, kwargs) and original output; ``|x|`` of the group."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    act: AbsMean = field(default_factory=AbsMean)


@torch.no_grad()
def capture_module(ctx: Any, inspect: torch.nn.Module, first_layer: torch.nn.Module, keep_outputs: bool = True) -> ModuleCapture:
    """Record how ``inspect`` is called on each batch and what it returns (unless not
    ``keep_outputs``: a search in another precision recomputes them), and the mean ``|x|`` of
    ``first_layer``'s input; stops each batch's forward when ``inspect`` returns."""
    cap = ModuleCapture()

    def pre_inspect(module, args, kwargs):
        cap.calls.append((args, dict(kwargs)))

    def pre_layer(module, args):
        cap.act.add(args[0])

    def post_inspect(module, args, kwargs, output):
        if keep_outputs:
            cap.outputs.append(first_tensor(output).detach())
        raise _Stop

    with hooks(
        inspect.register_forward_pre_hook(pre_inspect, with_kwargs=True),
        first_layer.register_forward_pre_hook(pre_layer),
        inspect.register_forward_hook(post_inspect, with_kwargs=True),
    ):
        run_block(ctx)
    return cap


@dataclass
class LinearCapture:
    """``X^T X`` (``[in, in]``, float32) and mean ``|x|`` of one linear layer's input, and the token count."""

    gram: torch.Tensor
    act: AbsMean


@torch.no_grad()
def capture_linear(ctx: Any, layer: torch.nn.Linear) -> LinearCapture:
    """Accumulate the Gram matrix of ``layer``'s input over all tokens; stops at ``layer``."""
    act = AbsMean()
    gram = torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device)

    def pre_layer(module, args):
        x2 = act.add(args[0])
        gram.addmm_(x2.T, x2)
        raise _Stop

    with hooks(layer.register_forward_pre_hook(pre_layer)):
        run_block(ctx)
    return LinearCapture(gram, act)


@torch.no_grad()
def capture_group_grams(ctx: Any, layers: dict[str, tuple[torch.nn.Linear, int]], n_tokens: int) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-group Gram matrices ``[n_groups, group, group]`` of each layer's input on a token
    subsample: every ``step``-th token of all batches joined, ``step = total // n_tokens`` (the
    anchors' subsample). ``layers`` maps names to ``(layer, group size)``. Returns
    ``{name: (grams, tokens used)}`` from one block forward."""
    total = sum(h.shape[0] * h.shape[1] for h in ctx.inputs)
    step = max(1, total // n_tokens)
    out: dict[str, tuple[torch.Tensor, int]] = {}
    offset = [0]

    def make_hook(name: str, in_f: int, group: int):
        def pre(module, args):
            x2 = args[0].reshape(-1, in_f)
            start = (-offset[0]) % step  # first index in this batch that lands on the global stride
            xs = x2[start::step].float().reshape(-1, in_f // group, group)
            g = torch.einsum("tgi,tgj->gij", xs, xs)
            prev, n = out.get(name, (0, 0))
            out[name] = (prev + g, n + xs.shape[0])

        return pre

    def advance(i: int) -> None:
        if i:
            offset[0] += ctx.inputs[i - 1].shape[0] * ctx.inputs[i - 1].shape[1]

    handles = [m.register_forward_pre_hook(make_hook(n, m.in_features, g)) for n, (m, g) in layers.items()]
    with hooks(*handles):
        run_block(ctx, advance)
    return out
