"""AWQ's per-channel scale search for one group of linear layers, and folding the chosen scales.

For a group whose layers read ``x``, a candidate scale ``s`` (one per input channel) replaces each
layer's weight ``W`` by ``Q(W·diag(s))·diag(s)^-1`` -- the quantized weight the layer will have once
``s`` is folded into the op producing ``x`` -- and the loss is the mean squared error of the
inspect module's output against the float output, summed over *all* calibration batches before the
best candidate is picked.

Two evaluation paths give that same loss:
- module path (inspect is e.g. the attention or the MLP): the float output is computed once per
  group, the quantized weights of all grid points once (one batched quantize-dequantize), then the
  inspect module runs once per grid point and batch;
- linear path (inspect is the group's only linear layer, as for o_proj and down_proj): the output
  error of ``ΔW = Q(W·s)/s - W`` over tokens ``X`` is ``tr(ΔW XᵀX ΔWᵀ) / (tokens·out)``, so ``XᵀX``
  is accumulated once and every grid point costs one ``[out, in] x [in, in]`` product instead of a
  pass over the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmc_core import layer_ops
from llmc_core.layer_ops import original_weight, rebase, set_weight
from llmc_core.quant.fake import fake_quantize_, group_view
from llmc_plugins.methods.awq.capture import ModuleCapture, cast, chunks, first_tensor


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


def quantized_weights(w: torch.Tensor, scales: torch.Tensor, spec: Any) -> torch.Tensor:
    """``Q(W·diag(s))·diag(s)^-1`` for every candidate: ``[P, out, in]`` float32, one batched call."""
    s = scales.view(scales.shape[0], 1, -1)
    wq = fake_quantize_((w.float().unsqueeze(0) * s).contiguous(), spec)
    return wq.div_(s)


@torch.no_grad()
def module_losses(inspect: torch.nn.Module, layers: list[torch.nn.Linear], cap: ModuleCapture, cand: Candidates, spec: Any, awq_bs: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Loss of every candidate through the inspect module (module path); returns ``[P]`` float64.

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
    # The grid's weights, quantized a few candidates per batched call and kept in the search dtype.
    qweights = [torch.cat([quantized_weights(w, part, spec).to(w.dtype) for part in cand.scales.split(5)]) for w in originals]
    numel = sum(o.numel() for o in refs)
    losses = torch.zeros(len(cand.alphas), dtype=torch.float64)
    try:
        for p in range(len(cand.alphas)):
            for layer, wq in zip(layers, qweights):
                set_weight(layer, wq[p])
            total = 0.0
            for (args, kwargs), ref in zip(calls, refs):
                start = 0
                for a, kw in chunks(args, kwargs, awq_bs):
                    out = first_tensor(inspect(*a, **kw))
                    diff = out.float() - ref[start : start + out.shape[0]].float()
                    total += float(diff.pow_(2).sum())
                    start += out.shape[0]
            losses[p] = total / numel
    finally:
        for layer, w in zip(layers, originals):
            set_weight(layer, w)
    return losses


@torch.no_grad()
def linear_losses(layer: torch.nn.Linear, gram: torch.Tensor, tokens: int, cand: Candidates, spec: Any) -> torch.Tensor:
    """Loss of every candidate for a group whose inspect module is its one linear layer (linear
    path): ``tr(ΔW G ΔWᵀ) / (tokens·out)`` with ``G = XᵀX``; returns ``[P]`` float64."""
    w = layer.weight.data.float()
    dw = quantized_weights(w, cand.scales, spec).sub_(w)
    # Batch over a few candidates at a time: [p, out, in] @ [in, in] stays a large matmul.
    losses = []
    for part in dw.split(4):
        losses.append((torch.matmul(part, gram) * part).sum(dim=(1, 2)).double())
    return torch.cat(losses) / (tokens * w.shape[0])


def fold_scales(prev: Any, layers: list[Any], s: torch.Tensor, norm_offset: float = 0.0, also_scale: tuple[Any, ...] = ()) -> None:
    """Fold ``s`` in exactly (see :func:`llmc_core.layer_ops.fold_scales`, the one implementation)."""
    layer_ops.fold_scales(prev, layers, s, norm_offset, also_scale)


def fold_target_size(prev: Any) -> int | None:
    """How many channels ``prev`` produces (None when it is neither a linear layer, a fused part nor a norm)."""
    if isinstance(prev, tuple) or isinstance(prev, (torch.nn.Linear, layer_ops.ExpertWeight)) or layer_ops.is_norm(prev):
        return layer_ops.output_width(prev)
    return None
