"""AWQ's per-channel scale search for one group of linear layers, and folding the chosen scales.

For a group whose layers read ``x``, a candidate scale ``s`` (one per input channel) replaces each
layer's weight ``W`` by ``Q(W·diag(s))·diag(s)^-1`` -- the quantized weight the layer will have once
``s`` is folded into the op producing ``x`` -- and the loss is the mean squared error of the
inspect module's output against the float output, summed over *all* calibration batches before the
best candidate is picked.

Two evaluation paths give that same loss:
- module path (inspect is e.g. the attention or the MLP): the float output is computed once per
  group, then for each grid point the layers' quantized weights (one candidate at a time) and the
  inspect module's forward on every batch;
- linear path (inspect is the group's only linear layer, as for o_proj and down_proj): the output
  error of ``ΔW = Q(W·s)/s - W`` over tokens ``X`` is ``tr(ΔW XᵀX ΔWᵀ) / (tokens·out)``, so ``XᵀX``
  is accumulated once and every grid point costs one ``[out, in] x [in, in]`` product instead of a
  pass over the tokens.

Memory does not grow with ``n_grid``: candidates are quantized at most :data:`GRID_CHUNK_BYTES` at a
time (one candidate for large layers), so the search's peak is about the block, its activations and
a few ``[out, in]`` float32 copies of the largest layer (Llama-2-7B down_proj: 180 MB each;
70B: 0.94 GB each), where the whole 20-point grid at once was 3.6 GB (7B) and 19 GB (70B).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmc_core import layer_ops
from llmc_core.blockwise import first_tensor
from llmc_core.layer_ops import original_weight, rebase, set_weight
from llmc_core.quant.fake import fake_quantize_, group_view
from llmc_plugins.methods.awq.capture import ModuleCapture, cast, chunks


@dataclass
class Candidates:
    """The scale grid: ``scales`` is ``[P, in]``; ``alphas[p]`` is the exponent (None: identity)."""

    scales: torch.Tensor
    alphas: list[float | None]


def weight_mean(layers: list[torch.nn.Linear], spec: Any) -> torch.Tensor:
    """ModelTC's (``trans_version: v1``) weight statistic: per layer, ``|W|`` divided by its
    quantization group's max, averaged over output rows; then averaged over the layers."""
    total = None
    for layer in layers:
        w = layer.weight.detach().float()
        wg = group_view(w, spec).abs()
        rel = (wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-12)).reshape(w.shape).mean(0)
        total = rel if total is None else total + rel
    return total / len(layers)


def candidates(x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int) -> Candidates:
    """``s = mean|x|^a`` (``w_mean`` None, llm-awq / ``v2``) or ``mean|x|^a / mean|w|^(1-a)``
    (duo scaling, AutoAWQ / ``v1``) for ``a = 0, 1/n_grid, ..., (n_grid-1)/n_grid``, each
    normalised by ``sqrt(max(s)·min(s))``. With duo scaling ``a = 0`` is not the identity, so the
    identity (plain RTN) is added as an extra candidate: the search can never do worse than RTN."""
    x_mean = x_mean.float()
    alphas: list[float | None] = [i / n_grid for i in range(n_grid)]
    a = torch.tensor(alphas, device=x_mean.device).view(-1, 1)
    s = x_mean.view(1, -1).pow(a)
    if w_mean is not None:
        s = s / w_mean.float().clamp(min=1e-8).view(1, -1).pow(1 - a)
    s = s.clamp(min=1e-4)
    s = s / (s.amax(dim=1, keepdim=True) * s.amin(dim=1, keepdim=True)).sqrt()
    if w_mean is not None:
        s = torch.cat([s, torch.ones_like(s[:1])])
        alphas.append(None)
    return Candidates(s, alphas)


# The search quantizes candidates a few at a time: at most this many bytes of ``[p, out, in]``
# float32 per batched call (at least one candidate). A 70B down_proj (8192 x 28672) is 0.94 GB per
# candidate, so the whole 20-point grid at once would be 19 GB; chunked, memory is one candidate.
GRID_CHUNK_BYTES = 256 * 2**20


def grid_chunk(w: torch.Tensor, most: int) -> int:
    """How many candidates of ``w``'s shape one batched call takes (1..``most``)."""
    per = w.shape[-2] * w.shape[-1] * 4
    return max(1, min(most, GRID_CHUNK_BYTES // per))


def quantized_weights(w: torch.Tensor, scales: torch.Tensor, spec: Any) -> torch.Tensor:
    """``Q(W·diag(s))·diag(s)^-1`` for the candidates in ``scales`` (``[p, in]``): ``[p, out, in]``
    float32, one batched call (callers pass a :func:`grid_chunk` of the grid at a time)."""
    s = scales.view(scales.shape[0], 1, -1)
    wq = fake_quantize_((w.float().unsqueeze(0) * s).contiguous(), spec)
    return wq.div_(s)


def coarse_to_fine(n: int, loss: Callable[[int], float], step: int = 4) -> dict[int, float]:
    """Search the grid ``0..n-1`` for the smallest ``loss(i)`` without evaluating every point:
    every ``step``-th point first, then the two points half a step either side of the best so
    far, halving the step down to the neighbours. On a loss that is unimodal over the grid (AWQ's
    loss in alpha nearly is) it returns the grid's minimum in at most ``ceil(n/step) +
    2·log2(step)`` evaluations (20 points: 9) instead of ``n``; otherwise the best point it
    evaluated. Returns ``{index: loss}`` of the evaluated points."""
    seen: dict[int, float] = {}

    def at(i: int) -> None:
        if 0 <= i < n and i not in seen:
            seen[i] = loss(i)

    for i in range(0, n, step):
        at(i)
    while step > 1:
        step //= 2
        best = min(seen, key=seen.__getitem__)
        at(best - step)
        at(best + step)
    return seen


@torch.no_grad()
def module_losses(inspect: torch.nn.Module, layers: list[torch.nn.Linear], cap: ModuleCapture, cand: Candidates, spec: Any, awq_bs: int | None = None, dtype: torch.dtype | None = None, search: str = "grid") -> torch.Tensor:
    """Loss of every candidate through the inspect module (module path); returns ``[P]`` float64.
    ``search: coarse_to_fine`` evaluates only the points :func:`coarse_to_fine` visits over the
    alpha grid (plus the identity candidate of duo scaling); the others are ``inf``.

    ``dtype`` (e.g. bfloat16) runs the search's forward passes on a copy of the inspect module in
    that precision, the reference output included, as the anchors do with fp16 models on GPUs.
    """
    calls, refs = cap.calls, cap.outputs
    if dtype is not None and dtype != layers[0].weight.dtype:
        import copy

        copied = copy.deepcopy(inspect).to(dtype)
        layers = [rebase(layer, inspect, copied) for layer in layers]
        inspect = copied
        calls = [(cast(a, dtype), cast(kw, dtype)) for a, kw in calls]  # no-op when captured in dtype
        refs = [torch.cat([first_tensor(inspect(*a, **kw)) for a, kw in chunks(args, kwargs, awq_bs)]) for args, kwargs in calls]
    originals = [original_weight(layer) for layer in layers]
    numel = sum(o.numel() for o in refs)
    losses = torch.full((len(cand.alphas),), float("inf"), dtype=torch.float64)

    def loss(p: int) -> float:
        # One candidate's weights at a time (elementwise, so the same values as a batched call):
        # memory stays one layer per layer whatever n_grid is.
        for layer, w in zip(layers, originals):
            set_weight(layer, quantized_weights(w, cand.scales[p : p + 1], spec)[0].to(w.dtype))
        total = 0.0
        for (args, kwargs), ref in zip(calls, refs):
            start = 0
            for a, kw in chunks(args, kwargs, awq_bs):
                out = first_tensor(inspect(*a, **kw))
                diff = out.float() - ref[start : start + out.shape[0]].float()
                total += float(diff.pow_(2).sum())
                start += out.shape[0]
        losses[p] = total / numel
        return float(losses[p])

    try:
        grid = [p for p, a in enumerate(cand.alphas) if a is not None]
        if search == "coarse_to_fine":
            coarse_to_fine(len(grid), lambda i: loss(grid[i]))
        else:
            for p in grid:
                loss(p)
        for p, a in enumerate(cand.alphas):
            if a is None:  # duo scaling's identity: always measured, so the search never loses to RTN
                loss(p)
    finally:
        for layer, w in zip(layers, originals):
            set_weight(layer, w)
    return losses


@torch.no_grad()
def linear_losses(layer: torch.nn.Linear, gram: torch.Tensor, tokens: int, cand: Candidates, spec: Any) -> torch.Tensor:
    """Loss of every candidate for a group whose inspect module is its one linear layer (linear
    path): ``tr(ΔW G ΔWᵀ) / (tokens·out)`` with ``G = XᵀX``; returns ``[P]`` float64."""
    w = layer.weight.data.float()
    # A few candidates at a time ([p, out, in] @ [in, in] stays a large matmul), never the grid.
    losses = []
    for scales in cand.scales.split(grid_chunk(w, 4)):
        dw = quantized_weights(w, scales, spec).sub_(w)
        losses.append((torch.matmul(dw, gram).mul_(dw)).sum(dim=(1, 2)).double())
        del dw
    return torch.cat(losses) / (tokens * w.shape[0])


def fold_scales(prev: Any, layers: list[Any], s: torch.Tensor, norm_offset: float = 0.0, also_scale: tuple[Any, ...] = ()) -> None:
    """Fold ``s`` in exactly (see :func:`llmc_core.layer_ops.fold_scales`, the one implementation)."""
    layer_ops.fold_scales(prev, layers, s, norm_offset, also_scale)


def fold_target_size(prev: Any) -> int | None:
    """How many channels ``prev`` produces (None when it is neither a linear layer, a fused part nor a norm)."""
    if isinstance(prev, tuple) or isinstance(prev, (torch.nn.Linear, layer_ops.ExpertWeight)) or layer_ops.is_norm(prev):
        return layer_ops.output_width(prev)
    return None
