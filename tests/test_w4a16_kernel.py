"""The Triton W4A16 kernel against the torch reference (dequantize in float32, then matmul).

- ``gpu`` tests need CUDA and triton and are skipped without them (``benchmarks/gpu_check.sh``
  runs them on a GPU machine).
- The interpreter test runs the same kernels on CPU through ``TRITON_INTERPRET=1`` (numpy), in a
  subprocess so the flag cannot leak into other tests; it needs only ``pip install triton``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmc_core.quant import QuantSpec, quantize_weight
from llmc_core.quant.pack import dequantize_awq, pack_awq

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


def awq_layer(n: int, k: int, group: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    t = pack_awq(quantize_weight(w, QuantSpec(bit=4, group_size=group, scale_dtype="float16")))
    return t.qweight.to(device), t.qzeros.to(device), t.scales.to(device)


def reference(x: torch.Tensor, qweight, qzeros, scales, group: int) -> torch.Tensor:
    """float64 product of x and the dequantized weight: the exact answer to compare against."""
    w = dequantize_awq(qweight, qzeros, scales, group, torch.float64)
    return x.double() @ w.t()


def assert_close_to_reference(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Within a few units of output rounding (fp16: 2^-11, bf16: 2^-8) of the largest output."""
    eps = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    err = (y.double() - ref).abs().max().item()
    assert err <= 4 * eps * ref.abs().max().item(), (err, ref.abs().max().item())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 64, 100, 256, 1000, 2048, 3000])
def test_kernel_matches_reference_for_every_m(m, group, dtype):
    from llmc_core.quant.kernels import w4a16_matmul

    n, k = 1088, 1024  # N not a multiple of the widest tile; K of 8-32 groups
    qw, qz, sc = awq_layer(n, k, group, seed=m, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y = w4a16_matmul(x, qw, qz, sc, group)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close_to_reference(y, reference(x, qw, qz, sc, group), dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_split_k_workspace_is_left_clean_across_calls_and_shapes(m):
    from llmc_core.quant.kernels import w4a16
    from llmc_core.quant.kernels.w4a16 import KernelConfig, w4a16_matmul

    for n, k, split in [(4096, 4096, 8), (512, 2048, 16), (4096, 4096, 3)]:
        qw, qz, sc = awq_layer(n, k, 128, seed=n + split, device="cuda")
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        cfg = KernelConfig(block_m=1 if m == 1 else 16, block_n=128 if m == 1 else 64, block_k=64, split_k=split, use_dot=m > 1)
        first = w4a16_matmul(x, qw, qz, sc, 128, cfg)
        for _ in range(3):
            assert torch.equal(w4a16_matmul(x, qw, qz, sc, 128, cfg), first)
        assert_close_to_reference(first, reference(x, qw, qz, sc, 128), torch.float16)
        ws, cnt = w4a16._WORKSPACES[x.device]
        torch.cuda.synchronize()
        assert not ws.any() and not cnt.any()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_every_path_on_llama_shapes(shape):
    from llmc_core.quant.kernels.w4a16 import KernelConfig, w4a16_matmul

    n, k = shape
    qw, qz, sc = awq_layer(n, k, 128, device="cuda")
    for m, cfg in [(1, None), (16, None), (256, None), (256, KernelConfig(dequant=True)), (2048, KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8))]:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        assert_close_to_reference(w4a16_matmul(x, qw, qz, sc, 128, cfg), reference(x, qw, qz, sc, 128), torch.float16)


@pytest.mark.gpu
@needs_gpu
def test_quant_linear_cuda_forward_matches_its_cpu_reference():
    from llmc_core.quant.qlinear import QuantLinear

    lin = torch.nn.Linear(512, 256, bias=True)
    q = QuantLinear.from_quantized(quantize_weight(lin.weight, QuantSpec(bit=4, group_size=64, scale_dtype="float16")), lin.bias.half())
    x = torch.randn(2, 9, 512, dtype=torch.float16)
    cpu = q(x.float()).double()
    gpu = q.cuda()(x.cuda()).cpu()
    assert gpu.shape == (2, 9, 256) and gpu.dtype == torch.float16
    assert_close_to_reference(gpu, cpu, torch.float16)


INTERPRETER_CHECK = textwrap.dedent(
    """
    import torch
    from llmc_core.quant.kernels.w4a16 import KernelConfig, choose_config, w4a16_matmul, _WORKSPACES
    from tests.test_w4a16_kernel import assert_close_to_reference, awq_layer, reference

    cases = [  # (m, k, n, group, config or None for the dispatcher's choice)
        (1, 128, 72, 32, None),
        (1, 256, 64, 128, KernelConfig(block_m=1, block_n=32, block_k=64, split_k=3, use_dot=False)),
        (3, 128, 48, 32, KernelConfig(block_m=1, block_n=16, block_k=32, split_k=2, use_dot=False)),  # GEMV, several rows
        (3, 128, 64, 64, None),
        (5, 256, 40, 128, KernelConfig(block_m=16, block_n=16, block_k=32, split_k=2)),
        (20, 128, 64, 32, KernelConfig(block_m=16, block_n=32, block_k=32, split_k=1, group_m=2)),
        (4, 128, 64, 64, KernelConfig(dequant=True)),
    ]
    for dtype in (torch.float16, torch.bfloat16):
        for m, k, n, group, cfg in cases:
            if dtype == torch.bfloat16 and m > 1 and not (cfg and (cfg.dequant or not cfg.use_dot)):
                continue  # the interpreter's tl.dot gives garbage for bfloat16 (triton 3.9); GPU tests cover it
            qw, qz, sc = awq_layer(n, k, group, seed=m)
            x = torch.randn(m, k).to(dtype)
            y = w4a16_matmul(x, qw, qz, sc, group, cfg)
            assert y.dtype == dtype and y.shape == (m, n)
            assert_close_to_reference(y, reference(x, qw, qz, sc, group), dtype)
            assert torch.equal(w4a16_matmul(x, qw, qz, sc, group, cfg), y)  # split-K left its workspace clean
    assert choose_config(1, 64, 128, 32, torch.device("cpu")).split_k > 1
    ws, cnt = _WORKSPACES[torch.device("cpu")]
    assert not ws.any() and not cnt.any()
    print("interpreter ok")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install triton); runs on CPU through its interpreter")
def test_kernels_under_the_triton_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "interpreter ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install triton)")
def test_kernels_compile_for_hopper_without_a_gpu():
    """Ahead-of-time compilation for sm_90 (no device needed) catches what the interpreter cannot:
    lowering errors, and shared memory beyond the H100's 227 KiB."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llmc_core.quant.kernels import w4a16 as k

    def ptrs(dt: str, split: int) -> dict:
        ws = ("*fp32", "*i32") if split > 1 else (f"*{dt}", f"*{dt}")
        return {"x_ptr": f"*{dt}", "qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16", "out_ptr": f"*{dt}", "ws_ptr": ws[0], "cnt_ptr": ws[1]}

    ints = {"N": "i32", "K": "i32", "group_size": "i32", "stride_xm": "i32", "stride_om": "i32"}
    jobs = [
        (k._gemv_kernel, {**ptrs("fp16", 4), **ints}, {"BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 4}, 4),
        (k._gemm_kernel, {**ptrs("bf16", 2), "M": "i32", **ints}, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "GROUP_M": 8}, 4),
        (k._gemm_kernel, {**ptrs("fp16", 1), "M": "i32", **ints}, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 8}, 8),
        (k._dequant_kernel, {"qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16", "out_ptr": "*bf16", "N": "i32", "group_size": "i32"}, {"BLOCK_K": 32, "BLOCK_N": 128}, 4),
    ]
    for fn, sig, consts, warps in jobs:
        sig = {**sig, **dict.fromkeys(consts, "constexpr")}
        compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
        assert ".entry " + fn.__name__ in compiled.asm["ptx"]
        assert compiled.metadata.shared <= 227 * 1024
