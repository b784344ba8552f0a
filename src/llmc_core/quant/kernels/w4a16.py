"""W4A16 matrix multiply in Triton: ``y = x @ W`` with ``W`` stored as AWQ GEMM int4 tensors.

``x`` is ``[M, K]`` float16 or bfloat16; ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32
``[K/g, N/8]``, ``scales`` float16 ``[K/g, N]`` (layout: :mod:`llmc_core.quant.pack`). Three paths,
chosen per call by :func:`choose_config` from M (override with ``config=``):

- **GEMV** (M = 1): no tensor cores; each program multiplies its slice of K with FMAs and the K
  range is split over ``SPLIT_K`` programs so a few hundred programs stream the weights.
- **fused GEMM** (1 < M < ``LLMC_W4A16_DEQUANT_MIN_M``): ``tl.dot`` tiles; split-K while the
  output tiles alone cannot fill the GPU (small M).
- **dequantize + cuBLAS** (M >= ``LLMC_W4A16_DEQUANT_MIN_M``, default 1024): one Triton pass
  writes the float16/bf16 weight, then ``torch.matmul``; at large M the matmul is compute-bound
  and cuBLAS beats a Triton GEMM by more than the extra pass costs.

Numerics: codes and zero points are unpacked to integers, ``(q - z)`` (exact in fp16/bf16) goes
through the dot product with float32 accumulation, and each K tile's partial sum is multiplied by
its group's float32 scale, so the result matches the dequantize-then-matmul reference to float16
rounding. A K tile never straddles a group (``BLOCK_K`` divides ``group_size``).

Split-K reduction without extra launches: partial tiles are added with float32 atomics into a
per-device workspace; the last program of a tile (counted with an atomic) reads the sum, writes
the output and zeroes its workspace slot and counter for the next call. One call per stream at a
time shares the workspace (calls on one stream are ordered, which is what models do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl


@triton.jit
def _unpack(q, z):
    """Packed ``q [BLOCK_K, W]`` and ``z [W]`` to ``q - z`` as int32 ``[BLOCK_K, W, 8]``
    (``[:, j, c]`` is output column ``8j + c``: AWQ order puts column c at nibble [0,4,1,5,2,6,3,7][c])."""
    c = tl.arange(0, 8)
    shifts = ((c % 2) * 4 + c // 2) * 4
    qi = (q[:, :, None] >> shifts[None, None, :]) & 0xF  # arithmetic shift; the mask drops the sign
    zi = (z[:, None] >> shifts[None, :]) & 0xF
    return qi - zi[None, :, :]


@triton.jit
def _store_tile(acc, o_ptrs, o_mask, ws_ptr, cnt_ptr, tile, SPLIT_K: tl.constexpr):
    """Write ``acc`` (one split's partial sum when SPLIT_K > 1) to the output.

    Split-K: float32 atomics into this tile's workspace slot; the last program to count itself in
    reads the total, stores it, and zeroes the slot and its counter for the next call.
    """
    if SPLIT_K == 1:
        tl.store(o_ptrs, acc.to(o_ptrs.dtype.element_ty), mask=o_mask)
    else:
        ws_ptrs = ws_ptr + tile * acc.numel + tl.reshape(tl.arange(0, acc.numel), acc.shape)
        tl.atomic_add(ws_ptrs, acc)
        tl.debug_barrier()  # every thread's partial is in before the tile counts this program
        count = tl.atomic_add(cnt_ptr + tile, 1)
        if count == SPLIT_K - 1:
            total = tl.atomic_add(ws_ptrs, tl.zeros_like(acc))  # an atomic read: served by L2, not a stale L1
            tl.store(o_ptrs, total.to(o_ptrs.dtype.element_ty), mask=o_mask)
            tl.store(ws_ptrs, tl.zeros_like(acc))
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, cnt_ptr,
    N, K, group_size, stride_xm, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """One row of x per program row (grid: N tiles, SPLIT_K, M): FMAs, no tensor cores; the
    weight tile stays in its packed ``[BLOCK_K, BLOCK_N/8, 8]`` shape, so loads are contiguous."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    W: tl.constexpr = BLOCK_N // 8
    n8 = N // 8
    offs_w = pid_n * W + tl.arange(0, W)
    mask_w = offs_w < n8
    cols = offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]  # [W, 8] output columns
    mask_c = mask_w[:, None]
    offs_k = tl.arange(0, BLOCK_K)
    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_tiles)
    x_ptrs = x_ptr + row * stride_xm + t_start * BLOCK_K + offs_k
    w_ptrs = qw_ptr + (t_start * BLOCK_K + offs_k)[:, None] * n8 + offs_w[None, :]
    acc = tl.zeros((W, 8), dtype=tl.float32)
    for t in range(t_start, t_end):
        g = (t * BLOCK_K) // group_size
        x = tl.load(x_ptrs).to(tl.float32)
        q = tl.load(w_ptrs, mask=mask_w[None, :], other=0)
        z = tl.load(qz_ptr + g * n8 + offs_w, mask=mask_w, other=0)
        s = tl.load(sc_ptr + g * N + cols, mask=mask_c, other=0.0).to(tl.float32)
        w = _unpack(q, z).to(tl.float32)
        acc += tl.sum(x[:, None, None] * w, axis=0) * s
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * n8
    tile = row * tl.num_programs(0) + pid_n
    _store_tile(acc, out_ptr + row * stride_om + cols, mask_c, ws_ptr, cnt_ptr, tile, SPLIT_K)


@triton.jit
def _gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, sc_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, group_size, stride_xm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``tl.dot`` tiles (grid: M tiles x N tiles, SPLIT_K); ``(q - z)`` is exact in fp16/bf16, the
    group's scale multiplies each K tile's float32 partial sum."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M row tiles in a row share each weight tile while it is in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    W: tl.constexpr = BLOCK_N // 8
    n8 = N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * W + tl.arange(0, W)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_w = offs_w < n8
    k_tiles = K // BLOCK_K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_tiles)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (t_start * BLOCK_K + offs_k)[None, :]
    w_ptrs = qw_ptr + (t_start * BLOCK_K + offs_k)[:, None] * n8 + offs_w[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        g = (t * BLOCK_K) // group_size
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        q = tl.load(w_ptrs, mask=mask_w[None, :], other=0)
        z = tl.load(qz_ptr + g * n8 + offs_w, mask=mask_w, other=0)
        s = tl.load(sc_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = tl.reshape(_unpack(q, z).to(x_ptr.dtype.element_ty), (BLOCK_K, BLOCK_N))
        acc += tl.dot(x, w) * s[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * n8
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    _store_tile(acc, o_ptrs, mask_m[:, None] & mask_n[None, :], ws_ptr, cnt_ptr, pid, SPLIT_K)


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, sc_ptr, out_ptr, N, group_size, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n8 = N // 8
    packed_n = offs_n // 8
    col = offs_n % 8
    shifts = ((col % 2) * 4 + col // 2) * 4
    g = (pid_k * BLOCK_K) // group_size
    q = tl.load(qw_ptr + offs_k[:, None] * n8 + packed_n[None, :], mask=mask_n[None, :], other=0)
    z = tl.load(qz_ptr + g * n8 + packed_n, mask=mask_n, other=0)
    s = tl.load(sc_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    w = (((q >> shifts[None, :]) & 0xF) - ((z >> shifts) & 0xF)[None, :]).to(tl.float32) * s[None, :]
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask_n[None, :])


@dataclass(frozen=True)
class KernelConfig:
    """One launch shape. ``dequant=True`` selects dequantize + ``torch.matmul`` (tiles unused)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    dequant: bool = False


def dequant_min_m() -> int:
    """M from which :func:`choose_config` dispatches to dequantize + cuBLAS."""
    return int(os.environ.get("LLMC_W4A16_DEQUANT_MIN_M", "1024"))


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap``."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter (CPU tensors): any count works


def choose_config(M: int, N: int, K: int, group_size: int, device: torch.device) -> KernelConfig:
    """Tile shapes per M: a starting table, checked offline for register spills on sm_90 but not
    yet timed on a GPU (``benchmarks/w4a16_gemm.py --sweep`` measures the alternatives)."""
    if M >= dequant_min_m() or group_size % 16:
        return KernelConfig(dequant=True)
    if M == 1:
        cfg = KernelConfig(block_m=1, block_n=128, block_k=64, use_dot=False, num_warps=4, num_stages=4, group_m=1)
    elif M <= 16:
        cfg = KernelConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    elif M <= 32:
        cfg = KernelConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = KernelConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4)
    elif M <= 128:  # 8 warps: at 4 this tile spills registers on sm_90 (ptxas -v)
        cfg = KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=4)
    else:
        cfg = KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    block_k = _pow2_divisor(group_size, cfg.block_k)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    target = 2 * _sm_count(device)  # programs needed to keep every SM streaming weights
    split = max(1, min(K // block_k, target // tiles, 32)) if tiles < target else 1
    return replace(cfg, block_k=block_k, split_k=split)


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 partial sums and int32 tile counters; the kernel leaves them zeroed."""
    ws, cnt = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < tiles:
        floats = max(floats, ws.numel() if ws is not None else 0)
        tiles = max(tiles, cnt.numel() if cnt is not None else 0)
        ws, cnt = torch.zeros(floats, dtype=torch.float32, device=device), torch.zeros(tiles, dtype=torch.int32, device=device)
        _WORKSPACES[device] = (ws, cnt)
    return ws, cnt


def _check(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[int, int, int]:
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"w4a16_matmul: x must be a 2-D float16/bfloat16 tensor, got {tuple(x.shape)} {x.dtype}")
    M, K = x.shape
    N = scales.shape[1]
    if qweight.shape != (K, N // 8) or N % 8 or K % group_size:
        raise ValueError(f"w4a16_matmul: qweight {tuple(qweight.shape)} does not fit x {tuple(x.shape)}, N={N}, group_size={group_size}")
    if qzeros.shape != (K // group_size, N // 8) or scales.shape != (K // group_size, N):
        raise ValueError(f"w4a16_matmul: qzeros {tuple(qzeros.shape)} / scales {tuple(scales.shape)} do not match K={K}, N={N}, group_size={group_size}")
    return M, N, K


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``[K, N]`` weight in ``dtype`` (one Triton pass)."""
    K, N = qweight.shape[0], scales.shape[1]
    out = torch.empty(K, N, dtype=dtype, device=qweight.device)
    block_k, block_n = _pow2_divisor(group_size, 32), 128
    grid = (K // block_k, triton.cdiv(N, block_n))
    _dequant_kernel[grid](qweight, qzeros, scales, out, N, group_size, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return out


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, config: KernelConfig | None = None) -> torch.Tensor:
    """``x [M, K] @ W [K, N]`` in ``x.dtype``; ``config`` overrides :func:`choose_config`."""
    M, N, K = _check(x, qweight, qzeros, scales, group_size)
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or choose_config(M, N, K, group_size, x.device)
    if cfg.dequant:
        return x @ dequantize(qweight, qzeros, scales, group_size, x.dtype)
    if group_size % cfg.block_k or cfg.block_n % 8 or (cfg.use_dot and cfg.block_m < 16):
        raise ValueError(f"w4a16_matmul: block_k {cfg.block_k} must divide group_size {group_size}, block_n be a multiple of 8, and tl.dot needs block_m >= 16")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if not cfg.use_dot:  # GEMV: one program row per row of x
        n_tiles = triton.cdiv(N, cfg.block_n)
        ws, cnt = _workspace(x.device, M * n_tiles * cfg.block_n, M * n_tiles) if cfg.split_k > 1 else (out, out)
        _gemv_kernel[(n_tiles, cfg.split_k, M)](
            x, qweight, qzeros, scales, out, ws, cnt, N, K, group_size, x.stride(0), out.stride(0),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return out
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    ws, cnt = _workspace(x.device, tiles * cfg.block_m * cfg.block_n, tiles) if cfg.split_k > 1 else (out, out)
    _gemm_kernel[(tiles, cfg.split_k)](
        x, qweight, qzeros, scales, out, ws, cnt,
        M, N, K, group_size, x.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
