"""GPTQ's layer solver: the Hessian of a layer's input, and column-by-column quantization with the
rounding error fed back to the columns not yet quantized (Frantar et al., 2022, Algorithm 1).

For a linear layer with weight ``W`` (``[out, in]``) reading inputs ``X`` (``[tokens, in]``), the
layer-wise objective ``||X Wᵀ - X Qᵀ||²`` has Hessian ``H = 2 XᵀX / n``. Columns are quantized in
order; after column ``i`` is rounded, the remaining columns of the current block absorb its error
``(w - q) / [H⁻¹]ᵢᵢ · [H⁻¹]ᵢ,ᵢ₊₁:`` at once, and the columns after the block lazily, once per block
(the "lazy batch" update). ``H⁻¹`` is taken as the upper Cholesky factor of the inverse, which is
numerically what makes the update stable.

Group parameters (scale, zero point) come from :mod:`llmc_core.quant` (``column_qparams``): for a
group, on the group's columns as they are when its first column is reached (all earlier updates
applied); with ``static_groups`` on the original weight before any update; per-channel and
per-tensor specs compute them once on the whole weight, as RTN does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from llmc_core.errors import LlmcError
from llmc_core.quant.fake import QuantizedWeight, codes_dtype, column_qparams, global_scale, group_view, qparams, quantize_columns, weight_range

log = logging.getLogger("llmc.gptq")

# Dampings tried after ``percdamp`` fails: each 10x the previous (at least 0.1% of mean diag H).
DAMP_RETRIES = 6


# ``XᵀX`` is symmetric: only its upper block triangle is computed, in strips of this many rows
# (inputs narrower than two strips take one product). 62% of a full product's work at 576 inputs,
# 56% at 1536; strips of 128+ rows keep the matmuls efficient.
STRIP = 128
CONVERT_TOKENS = 2048


@dataclass
class Hessian:
    """Running ``XᵀX`` of one input (float32, ``[in, in]``, upper block triangle only until
    :meth:`value`) and its token count; several layers that read the same input share one."""

    xtx: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, in_features: int, device: Any) -> Hessian:
        return cls(torch.zeros(in_features, in_features, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        d = x2.shape[1]
        step = max(STRIP, -(-d // 8))  # at most 8 strips: the saving flattens, the calls do not
        # A float32 input is used as it is; another dtype (bfloat16 forwards) is widened
        # CONVERT_TOKENS rows at a time, not as one float32 copy of the whole call's input.
        for part in (x2,) if x2.dtype == torch.float32 else x2.split(CONVERT_TOKENS):
            part = part.float()
            for i in range(0, d, step):
                self.xtx[i : i + step, i:].addmm_(part[:, i : i + step].T, part[:, i:])
        self.tokens += x2.shape[0]

    def value(self) -> torch.Tensor:
        """``H = 2 XᵀX / n`` (the lower triangle mirrored from the upper one)."""
        if not self.tokens:
            raise LlmcError("GPTQ: a layer saw no calibration tokens; check calib.n_samples and that the model adapter names the block's layers.")
        h = torch.triu(self.xtx)
        h += torch.triu(self.xtx, 1).T  # three [in, in] matrices at most, fewer than the solver holds
        return h.mul_(2.0 / self.tokens)


@dataclass
class Solved:
    """One layer's result: the integer weight, and what the log reports."""

    weight: QuantizedWeight
    loss: float  # GPTQ's own estimate, sum over columns of (w - q)² / [H⁻¹]ᵢᵢ² / 2
    damp: float  # the damping that made H positive definite (absolute, added to diag H)
    retries: int  # how many times the damping was raised
    dead: int  # input columns that never saw a non-zero value (weights zeroed)
    extra: dict[str, Any] = field(default_factory=dict)


def inverse_factor(h: torch.Tensor, percdamp: float, name: str = "layer") -> tuple[torch.Tensor, float, int]:
    """The upper Cholesky factor of ``(H + damp·I)⁻¹``, ``damp = percdamp · mean(diag H)``; when
    that is not positive definite (in float32), damping is raised 10x at a time and logged.
    Returns ``(factor, damp, retries)``."""
    if not torch.isfinite(h).all():
        raise LlmcError(f"GPTQ: {name}'s input Hessian has NaN/inf values (the block's inputs overflowed). Try model.torch_dtype: float32.")
    mean = float(torch.diagonal(h).mean())
    damp = percdamp * mean
    for retry in range(DAMP_RETRIES + 1):
        if retry:
            damp = max(damp * 10, 1e-3 * mean)
        # One [in, in] temporary at a time besides h: a 70B down_proj's H alone is 3.3 GB.
        damped = h.clone()
        damped.diagonal().add_(damp)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            factor, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info) == 0 and torch.isfinite(factor).all():
                if retry:
                    log.warning("GPTQ %s: H was not positive definite with percdamp; damping raised to %.3g (%.3g x mean diag H) after %d retries", name, damp, damp / mean, retry)
                return factor, damp, retry
    raise LlmcError(f"GPTQ: {name}'s input Hessian stays singular even with damping {damp:.3g}; raise quant.special.percdamp or use more calibration samples.")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: Any, blocksize: int = 128, percdamp: float = 0.01, actorder: bool = False, static_groups: bool = False, name: str = "layer", weighted: bool = False) -> Solved:
    """Quantize ``w`` (``[out, in]``) against Hessian ``h`` (``[in, in]``); ``h`` is not modified.

    ``actorder``: quantize columns in descending ``diag H`` (the inputs with the most energy first,
    while the most columns remain to absorb their error). Per-group specs then form their groups in
    that order, and the result's ``g_idx`` maps each column to its group; with ``static_groups``
    the groups are the consecutive columns of the original weight (no ``g_idx``).
    """
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    out_f, n = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0  # a dead input constrains nothing; its weights are zeroed (as the reference)
    W[:, dead] = 0.0
    blocks = spec.granularity == "per_block"  # tiles: a group of block_size[1] columns, parameters per row tile
    g = spec.group_size if spec.granularity == "per_group" else spec.block_size[1] if blocks else None
    gs = global_scale(W, spec)  # NVFP4: one global scale from the whole weight, whatever the column order
    gmax = W.abs().amax() if gs is not None else None
    d = torch.diagonal(H).clone() if weighted else None  # each column's input energy, for mse's range search
    fixed = column_qparams(W, spec, d) if g is None else None
    static = _static_groups(W, spec, d) if g is not None and (static_groups or blocks) else None
    perm = None
    if actorder:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        d = None if d is None else d[perm]
    hinv, damp, retries = inverse_factor(H, percdamp, name)
    del H

    codes = torch.zeros_like(W)
    n_groups = n // g if g is not None else 1
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = torch.zeros_like(scales)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        with _one_thread(W.device):
            _solve_block(W, W1, err1, hinv, hinv1, i1, codes, scales, zeros, loss, spec, g, fixed, static, perm, d, gmax)
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if g is not None and static is None:
            g_idx = (invperm // g).to(torch.int64)
    if g is None:
        scales, zeros = fixed[0].reshape(-1, 1), fixed[1].reshape(-1, 1)
    elif static is not None:
        scales = torch.cat([s for s, _ in static], dim=1)
        zeros = torch.cat([z for _, z in static], dim=1)
        if blocks:  # one row per row tile
            scales, zeros = scales[:: spec.block_size[0]].contiguous(), zeros[:: spec.block_size[0]].contiguous()
    qw = QuantizedWeight(codes.to(codes_dtype(spec)), scales, zeros, spec, g_idx, gs)
    return Solved(qw, float(loss), damp, retries, int(dead.sum()))


def _static_groups(W: torch.Tensor, spec: Any, d: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each group's ``(scale, zero)`` (``[out, 1]``) from the original weight's consecutive columns,
    all groups in one search (``calib_algo: mse`` weighted by ``d``, ``[in]``, when given)."""
    out_f, n = W.shape
    if spec.granularity == "per_block":
        c = spec.block_size[1]
        return [column_qparams(W[:, k : k + c], spec, None if d is None else d[k : k + c]) for k in range(0, n, c)]
    g = spec.group_size
    wg = group_view(W, spec)  # [out * n/g, g]: row r is output r // (n/g), group r % (n/g)
    importance = None if d is None else d.reshape(1, n // g, g).expand(out_f, -1, -1).reshape(-1, g)
    scale, zero = qparams(wg, spec, *weight_range(wg, spec, importance))
    scale, zero = scale.reshape(out_f, n // g), zero.reshape(out_f, n // g)
    return [(scale[:, k : k + 1], zero[:, k : k + 1]) for k in range(n // g)]


def _solve_block(W, W1, err1, hinv, hinv1, i1, codes, scales, zeros, loss, spec, g, fixed, static, perm, d=None, gmax=None) -> None:
    """Quantize the columns of one lazy-update block ``W1`` (starting at column ``i1``) in place:
    codes, group parameters and the loss go into the given tensors, each column's scaled error
    into ``err1``."""
    scale = zero = None
    for i in range(W1.shape[1]):
        col = i1 + i
        if fixed is not None:
            scale, zero = fixed
        elif static is not None:
            scale, zero = static[int(perm[col] if perm is not None else col) // g]
        elif col % g == 0:
            scale, zero = column_qparams(_current_columns(W, W1, err1, hinv, i1, i, g), spec, None if d is None else d[col : col + g], global_amax=gmax)
            scales[:, col // g], zeros[:, col // g] = scale[:, 0], zero[:, 0]
        elif scale is None:  # a block that starts inside a group: that group's parameters
            k = col // g
            scale, zero = scales[:, k : k + 1], zeros[:, k : k + 1]
        wcol = W1[:, i : i + 1]
        q, dq = quantize_columns(wcol, scale, zero, spec)
        codes[:, col] = q[:, 0]
        e = (wcol - dq) / hinv1[i, i]
        W1[:, i:] -= e @ hinv1[i : i + 1, i:]
        err1[:, i] = e[:, 0]
    loss += err1.double().pow(2).sum() / 2  # GPTQ's loss: sum of (w - q)² / [H⁻¹]ᵢᵢ², halved


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny vector ops: on CPU, worker threads only add
    synchronisation (16x slower with 2 threads on a loaded 2-core machine), so it runs on one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _current_columns(W: torch.Tensor, W1: torch.Tensor, err1: torch.Tensor, hinv: torch.Tensor, i1: int, i: int, g: int) -> torch.Tensor:
    """The ``g`` columns starting at ``i1 + i`` with every update so far applied: those inside the
    current block are in ``W1``; those past it still lack the current block's pending update."""
    inside = W1[:, i : i + g]
    if inside.shape[1] == g:
        return inside
    i2 = i1 + W1.shape[1]
    end = i1 + i + g
    beyond = W[:, i2:end] - err1[:, :i] @ hinv[i1 : i1 + i, i2:end]
    return torch.cat([inside, beyond], dim=1)
