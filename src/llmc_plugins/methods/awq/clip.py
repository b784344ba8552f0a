"""AWQ's weight clipping search: per output channel and quantization group, the range shrink that
minimises the group's output error on a token subsample.

For a group ``g`` of row ``o`` the anchors measure ``mean_t (Q(clamp(w)) - w)·x_t`` restricted to the
group's inputs; with ``H_g = Σ_t x_t,g x_t,gᵀ`` (``[group, group]``, accumulated once) that error is
``Δwᵀ H_g Δw / tokens``, so every shrink candidate of every row costs a ``group x group`` product
instead of a pass over the tokens. All candidates are quantized in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmc_core.quant.fake import fake_quantize_

# Layers the anchors never clip (queries and keys feed a softmax, where clipping hurts); a fused
# qkv_proj (Phi-3) holds the queries and keys too.
NO_CLIP = ("q_", "k_", "query", "key", "Wqkv", "qkv_proj")


def clippable(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return not any(tag in leaf for tag in NO_CLIP)


def clip_group_size(spec: Any, in_features: int) -> int:
    return spec.group_size if spec.granularity == "per_group" else in_features


@dataclass
class ClipRange:
    """The chosen range per row and group: ``lo``/``hi`` are ``[out, n_groups, 1]`` float32."""

    lo: torch.Tensor
    hi: torch.Tensor
    shrink: torch.Tensor  # [out, n_groups]: the chosen shrink factor (1 = not clipped)

    def to(self, device: Any) -> ClipRange:
        return ClipRange(self.lo.to(device), self.hi.to(device), self.shrink.to(device))

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` clamped to the range (a new tensor of ``w``'s shape and dtype)."""
        out_f, in_f = w.shape
        wg = w.float().reshape(out_f, self.lo.shape[1], -1)
        return torch.clamp(wg, self.lo, self.hi).reshape(out_f, in_f).to(w.dtype)


def rescale_grams(grams: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Gram matrices of ``x / s`` from those of ``x``: ``H_g / (s_g s_gᵀ)`` per group."""
    sg = s.to(grams.device, torch.float32).view(grams.shape[0], grams.shape[1])
    return grams / (sg.unsqueeze(2) * sg.unsqueeze(1))


@torch.no_grad()
def search_clip(w: torch.Tensor, grams: torch.Tensor, tokens: int, spec: Any, clip_sym: bool, n_grid: int = 20, max_shrink: float = 0.5, rows_per_step: int = 256) -> tuple[ClipRange, float, float]:
    """Search the shrink grid ``1, 1 - 1/n_grid, ...`` (``int(max_shrink·n_grid)`` points) for each
    row and group of ``w`` (``[out, in]``). ``grams`` is ``[n_groups, group, group]``.

    With ``clip_sym`` the range is ``±max|w|·f``, otherwise ``[min(w)·f, max(w)·f]``. Weights are
    clamped to the range, then quantized with ``spec`` as the final quantization does.
    Returns the range and the summed error before and after (for the log).
    """
    out_f, in_f = w.shape
    n_groups, group = grams.shape[0], grams.shape[1]
    factors = torch.tensor([1 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))], device=w.device)
    wg_all = w.float().reshape(out_f, n_groups, group)
    los, his, shrinks = [], [], []
    err_before = err_after = 0.0
    for r in range(0, out_f, rows_per_step):  # bounds memory: [P, rows, in] per step
        wg = wg_all[r : r + rows_per_step]
        org_hi = wg.abs().amax(-1, keepdim=True) if clip_sym else wg.amax(-1, keepdim=True)
        org_lo = -org_hi if clip_sym else wg.amin(-1, keepdim=True)
        f = factors.view(-1, 1, 1, 1)
        hi, lo = org_hi.unsqueeze(0) * f, org_lo.unsqueeze(0) * f  # [P, rows, groups, 1]
        cand = torch.clamp(wg.unsqueeze(0), lo, hi).reshape(len(factors), -1, in_f).contiguous()
        dw = fake_quantize_(cand, spec).reshape(len(factors), -1, n_groups, group) - wg.unsqueeze(0)
        # err[p, o, g] = dw[p, o, g] · H_g · dw[p, o, g]
        err = (torch.einsum("pogi,gij->pogj", dw, grams) * dw).sum(-1) / tokens
        best = err.argmin(dim=0)  # first minimum: ties keep the unclipped range
        idx = best.unsqueeze(0)  # [1, rows, groups]
        his.append(torch.gather(hi.squeeze(-1), 0, idx).squeeze(0).unsqueeze(-1))
        los.append(torch.gather(lo.squeeze(-1), 0, idx).squeeze(0).unsqueeze(-1))
        shrinks.append(factors[best])
        err_before += float(err[0].sum())
        err_after += float(err.gather(0, idx).sum())
    return ClipRange(torch.cat(los), torch.cat(his), torch.cat(shrinks)), err_before, err_after
