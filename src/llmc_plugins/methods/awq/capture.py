"""Capturing what AWQ needs from a block, in one forward pass over the cached inputs.

As llm-awq does, one float forward of the block records everything before any scale is folded:
the call (args, kwargs) and output of each group's inspect module, the mean ``|x|`` of each group's
input, ``X^T X`` for groups searched on their one linear layer, per-group Gram matrices for the clip
search on a token subsample, and the block's outputs (the next block's inputs). Folding a group's
scales is exact in real arithmetic and changes only that group's own input (to ``x / s``), so what
was captured stays valid for every later group; the clip search rescales its Gram matrices by the
folded scales instead of running the block again. Statistics are reduced inside the hooks, so the
full activations of a linear layer are never stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from llmc_core.blockwise import first_tensor, hidden_of, split_call


@contextmanager
def hooks(*handles: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
    limit: int | None = None  # record calls until they hold this many tokens (``search_tokens``); None: all
    tokens: int = 0  # tokens in the recorded calls
    recording: bool = False  # whether the call in progress is recorded (its output goes with it)


@dataclass
class LinearCapture:
    """``X^T X`` (``[in, in]``, float32) and mean ``|x|`` of one linear layer's input (token count in ``act``)."""

    gram: torch.Tensor
    act: AbsMean = field(default_factory=AbsMean)


@dataclass
class Target:
    """One scale-search group, resolved to modules: ``linear`` groups are searched on ``X^T X`` of
    their one layer (``inspect`` is that layer), the others through ``inspect``'s forward."""

    name: str
    inspect: torch.nn.Module
    layers: list[torch.nn.Linear]
    linear: bool = False


@dataclass
class BlockCapture:
    modules: dict[str, ModuleCapture] = field(default_factory=dict)  # by target name
    linears: dict[str, LinearCapture] = field(default_factory=dict)  # by target name
    clip_grams: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # by layer name
    outputs: list[torch.Tensor] = field(default_factory=list)
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # id(experts module) -> tokens per expert


def cast(v: Any, dtype: torch.dtype | None) -> Any:
    """``v`` with its floating-point tensors (also inside tuples, lists, dicts) in ``dtype``."""
    if dtype is None:
        return v
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, (tuple, list)):
        return type(v)(cast(x, dtype) for x in v)
    if isinstance(v, dict):
        return {k: cast(x, dtype) for k, x in v.items()}
    return v


# Without ``awq_bs``, the capture forward and the search's forward passes take at most this many
# tokens at a time: the results are the same, and memory stays flat however many samples there are.
CHUNK_TOKENS = 8192


def chunks(args: tuple, kwargs: dict, size: int | None):
    """Split one batch's call into sub-batches of ``size`` samples (``awq_bs``; default: as many as
    make :data:`CHUNK_TOKENS` tokens), as :func:`llmc_core.blockwise.split_call` cuts them."""
    return split_call(args, kwargs, max_tokens=CHUNK_TOKENS, size=size)


def _module_hooks(t: Target, cap: ModuleCapture, dtype: torch.dtype | None) -> list[Any]:
    """Record ``t.inspect``'s calls (cast to ``dtype``, the search precision, when given: the search
    then recomputes the reference outputs in that precision, so none are kept) and ``|x|``."""

    def pre_inspect(module, args, kwargs):
        cap.recording = cap.limit is None or cap.tokens < cap.limit
        if cap.recording:  # the search's loss runs on these; |x| below sees every call
            x = hidden_of(args, kwargs)
            cap.tokens += x.numel() // x.shape[-1]
            cap.calls.append((cast(args, dtype), cast(dict(kwargs), dtype)))

    def post_inspect(module, args, kwargs, output):
        if cap.recording:
            cap.outputs.append(first_tensor(output).detach())

    def pre_layer(module, args):
        cap.act.add(args[0])

    def pre_inspect_act(module, args, kwargs):
        cap.act.add(hidden_of(args, kwargs))

    handles = [t.inspect.register_forward_pre_hook(pre_inspect, with_kwargs=True)]
    if isinstance(t.layers[0], torch.nn.Module):
        handles.append(t.layers[0].register_forward_pre_hook(pre_layer))
    else:  # a fused expert's view cannot be hooked: the group's input is the inspect module's (the MoE block's)
        handles.append(t.inspect.register_forward_pre_hook(pre_inspect_act, with_kwargs=True))
    if dtype is None:
        handles.append(t.inspect.register_forward_hook(post_inspect, with_kwargs=True))
    return handles


def _linear_hooks(layer: torch.nn.Linear, cap: LinearCapture) -> list[Any]:
    def pre_layer(module, args):
        x2 = cap.act.add(args[0])
        cap.gram.addmm_(x2.T, x2)

    return [layer.register_forward_pre_hook(pre_layer)]


def _expert_hooks(targets: list[tuple[Target, LinearCapture]], tokens: dict[int, list[int]]) -> list[Any]:
    """For fused experts, whose matrices are not modules: one pre-hook per experts module that
    recomputes each expert's down_proj input from the module's own inputs (hidden states and the
    router's top-k choice) and feeds the ``X^T X`` of the targets on those views; it also counts
    the tokens each expert receives (for the log)."""
    from llmc_core.layer_ops import expert_down_input, expert_routing

    by_module: dict[int, tuple[torch.nn.Module, dict[int, LinearCapture]]] = {}
    for t, cap in targets:
        view = t.layers[0]
        by_module.setdefault(id(view.module), (view.module, {}))[1][view.index] = cap

    def make(module: torch.nn.Module, caps: dict[int, LinearCapture]):
        n_experts = getattr(module, "num_experts", None) or module.down_proj.shape[0]
        tokens[id(module)] = [0] * n_experts

        def pre(mod, args, kwargs):
            call = {**dict(zip(("hidden_states", "top_k_index"), args)), **kwargs}
            x, top_k = call["hidden_states"], call["top_k_index"]
            for e, idx in enumerate(expert_routing(top_k, n_experts)):
                tokens[id(module)][e] += int(idx.numel())
                if e in caps and idx.numel():
                    x2 = caps[e].act.add(expert_down_input(mod, x[idx], e))
                    caps[e].gram.addmm_(x2.T, x2)

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    return [make(m, caps) for m, caps in by_module.values()]


def _clip_hooks(layers: dict[str, tuple[torch.nn.Linear, int]], out: dict[str, tuple[torch.Tensor, int]], step: int, offset: list[int]) -> list[Any]:
    """Per-group Gram matrices ``[n_groups, group, group]`` of each layer's input on every
    ``step``-th token of all batches joined (the anchors' subsample); ``offset[0]`` is the number
    of tokens in the batches before the current one."""

    def make(name: str, in_f: int, group: int):
        def pre(module, args):
            x2 = args[0].reshape(-1, in_f)
            start = (-offset[0]) % step  # first index in this batch that lands on the global stride
            xs = x2[start::step].float().reshape(-1, in_f // group, group)
            g = torch.einsum("tgi,tgj->gij", xs, xs)
            prev, n = out.get(name, (0, 0))
            out[name] = (prev + g, n + xs.shape[0])

        return pre

    return [m.register_forward_pre_hook(make(n, m.in_features, g)) for n, (m, g) in layers.items()]


@torch.no_grad()
def capture_block(ctx: Any, targets: list[Target], clip_layers: dict[str, tuple[torch.nn.Linear, int]] | None = None, clip_tokens: int = 512, dtype: torch.dtype | None = None, awq_bs: int | None = None, search_tokens: int | None = None) -> BlockCapture:
    """One forward of ``ctx.block`` over its cached batches, recording what ``targets`` (scale
    search) and ``clip_layers`` (``{name: (layer, group size)}``, clip search on ``clip_tokens``
    tokens) need, and the block's outputs (one tensor per batch). ``dtype``: the search precision,
    when it differs from the model's. Batches run in sub-batches of ``awq_bs`` samples (default:
    :data:`CHUNK_TOKENS` tokens), so each recorded call is one sub-batch. ``search_tokens``: the
    inspect modules' calls (and outputs) are recorded only until they hold that many tokens
    (whole sub-batches, the first ones), while ``|x|``, Gram matrices and clip statistics see
    every token; None records them all."""
    cap = BlockCapture()
    handles: list[Any] = []
    experts: list[tuple[Target, LinearCapture]] = []
    for t in targets:
        if t.linear:
            layer = t.layers[0]
            cap.linears[t.name] = LinearCapture(torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device))
            if isinstance(layer, torch.nn.Module):
                handles += _linear_hooks(layer, cap.linears[t.name])
            else:
                experts.append((t, cap.linears[t.name]))
        else:
            cap.modules[t.name] = ModuleCapture(limit=search_tokens)
            handles += _module_hooks(t, cap.modules[t.name], dtype)
    if experts:
        handles += _expert_hooks(experts, cap.expert_tokens)
    offset = [0]
    if clip_layers:
        total = sum(h.shape[0] * h.shape[1] for h in ctx.inputs)
        handles += _clip_hooks(clip_layers, cap.clip_grams, max(1, total // clip_tokens), offset)
    with hooks(*handles):
        for h, kw in zip(ctx.inputs, ctx.kwargs):
            outs = []
            for (part,), part_kw in chunks((h,), kw, awq_bs):  # bounded activations, as in the search
                outs.append(first_tensor(ctx.block(part, **part_kw)))
                offset[0] += part.shape[0] * part.shape[1]
            cap.outputs.append(torch.cat(outs) if len(outs) > 1 else outs[0])
    return cap
