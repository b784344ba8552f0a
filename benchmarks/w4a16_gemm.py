"""W4A16 GEMM benchmark: llmc's Triton kernel against fp16 ``torch.matmul`` in the same run.

For K x N in {4096x4096, 4096x11008, 11008x4096} and M in {1, 16, 64, 256, 2048} it prints the
kernel's time (the dispatcher's choice), fp16 (or bf16) ``torch.matmul`` on the dequantized weight, their
ratio (fp16 time / kernel time: above 1 the kernel is faster), the fused kernel and
dequantize + cuBLAS separately (what the dispatch threshold is chosen from), and the
memory-bound limits: bytes moved / measured device copy bandwidth. Times are medians of CUDA-graph
replays (launch overhead excluded for every contender alike).

    python benchmarks/w4a16_gemm.py                 # the table
    python benchmarks/w4a16_gemm.py --sweep         # also try a grid of tile configs per shape
    python benchmarks/w4a16_gemm.py --dtype bfloat16 --json out.json

Exits 0 with a message when CUDA or triton is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (K, N)
MS = (1, 16, 64, 256, 2048)


def timed(fn, reps: int = 20, rounds: int = 7) -> float:
    """Median microseconds per call of ``fn`` replayed from a CUDA graph (plain launches if capture fails)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run = graph.replay
    except Exception:  # noqa: BLE001 - a kernel that cannot be captured is timed with plain launches
        torch.cuda.synchronize()

        def run():
            for _ in range(reps):
                fn()

    run()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = timed(lambda: dst.copy_(src), reps=5, rounds=5)
    return 2 * src.numel() / (us * 1e-6)


def make_layer(k: int, n: int, group: int):
    """Random AWQ GEMM tensors (every nibble random) and their fp16 weight ``[K, N]``."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device="cuda", generator=g)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), dtype=torch.int32, device="cuda", generator=g)
    scales = (torch.rand(k // group, n, device="cuda", generator=g) * 2e-3 + 1e-3).half()
    return qweight, qzeros, scales


def bench(args) -> list[dict]:
    import torch

    from llmc_core.quant.kernels.w4a16 import KernelConfig, choose_config, dequantize, w4a16_matmul

    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  group {args.group}  copy bandwidth {bw / 1e9:.0f} GB/s")
    head = f"{'K x N':>12} {'M':>5} | {'kernel us':>9} {'torch us':>8} {'ratio':>6} | {'fused us':>8} {'deq+mm us':>9} | {'int4 bound':>10} {'fp16 bound':>10} | {'max rel err':>11}  path"
    print(head)
    print("-" * len(head))
    rows = []
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else SHAPES
    for k, n in shapes:
        qw, qz, sc = make_layer(k, n, args.group)
        w = dequantize(qw, qz, sc, args.group, dtype)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            cfg = choose_config(m, n, k, args.group, x.device)
            fused_cfg = cfg if not cfg.dequant else KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
            t_kernel = timed(lambda: w4a16_matmul(x, qw, qz, sc, args.group, cfg))
            t_fp16 = timed(lambda: torch.matmul(x, w))
            t_fused = t_kernel if not cfg.dequant else timed(lambda: w4a16_matmul(x, qw, qz, sc, args.group, fused_cfg))
            t_deq = t_kernel if cfg.dequant else timed(lambda: w4a16_matmul(x, qw, qz, sc, args.group, KernelConfig(dequant=True)))
            ref = torch.matmul(x.float(), w.float())
            err = ((w4a16_matmul(x, qw, qz, sc, args.group, cfg).float() - ref).abs().max() / ref.abs().max()).item()
            act = 2 * m * (k + n)
            int4_bytes = k * n // 2 + (k // args.group) * n * (2 + 0.5) + act
            fp16_bytes = 2 * k * n + act
            row = {
                "K": k, "N": n, "M": m, "kernel_us": t_kernel, "fp16_us": t_fp16, "ratio": t_fp16 / t_kernel,
                "fused_us": t_fused, "dequant_cublas_us": t_deq, "int4_bound_us": int4_bytes / bw * 1e6,
                "fp16_bound_us": fp16_bytes / bw * 1e6, "max_rel_err": err, "config": cfg.__dict__,
            }  # fmt: skip
            rows.append(row)
            path = "dequant+cuBLAS" if cfg.dequant else f"fused {cfg.block_m}x{cfg.block_n}x{cfg.block_k} split{cfg.split_k}"
            print(
                f"{k:>5} x {n:<5} {m:>5} | {t_kernel:9.1f} {t_fp16:8.1f} {row['ratio']:5.2f}x | {t_fused:8.1f} {t_deq:9.1f} | "
                f"{row['int4_bound_us']:10.1f} {row['fp16_bound_us']:10.1f} | {err:11.2e}  {path}"
            )
            if args.sweep:
                rows[-1]["sweep"] = sweep(x, qw, qz, sc, args.group, m, t_fp16)
        del w
        torch.cuda.empty_cache()
    return rows


def sweep(x, qw, qz, sc, group: int, m: int, t_fp16: float) -> list[dict]:
    """Time a grid of tile configs for one shape; print the three best."""
    import itertools

    from llmc_core.quant.kernels.w4a16 import KernelConfig, w4a16_matmul

    if m == 1:
        grid = [KernelConfig(block_m=1, block_n=bn, block_k=bk, split_k=s, use_dot=False, num_warps=4, num_stages=3, group_m=1) for bn, bk, s in itertools.product((64, 128, 256), (64, 128), (1, 4, 8, 16))]
    elif m <= 16:
        grid = [KernelConfig(block_m=16, block_n=bn, block_k=bk, split_k=s, num_warps=4, num_stages=4) for bn, bk, s in itertools.product((64, 128), (64, 128), (1, 2, 4, 8))]
    elif m <= 64:
        grid = [KernelConfig(block_m=64, block_n=bn, block_k=64, split_k=s, num_warps=4 if bn == 64 else 8, num_stages=4) for bn, s in itertools.product((64, 128), (1, 2, 4))]
    else:
        splits = (1, 2) if m <= 256 else (1,)
        grid = [KernelConfig(block_m=bm, block_n=128, block_k=64, split_k=s, num_warps=8, num_stages=3) for bm, s in itertools.product((64, 128), splits)]
    results = []
    for cfg in grid:
        if group % cfg.block_k:
            continue
        try:
            t = timed(lambda: w4a16_matmul(x, qw, qz, sc, group, cfg), reps=10, rounds=3)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this tile
            results.append({"config": cfg.__dict__, "error": type(exc).__name__})
            continue
        results.append({"config": cfg.__dict__, "us": t, "ratio": t_fp16 / t})
    best = sorted((r for r in results if "us" in r), key=lambda r: r["us"])[:3]
    for r in best:
        c = r["config"]
        print(f"    sweep: {r['us']:8.1f} us {r['ratio']:5.2f}x  bm{c['block_m']} bn{c['block_n']} bk{c['block_k']} split{c['split_k']} warps{c['num_warps']} stages{c['num_stages']} dot={c['use_dot']}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--group", type=int, default=128, choices=(32, 64, 128))
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tile configs per shape")
    parser.add_argument("--shapes", nargs="+", metavar="KxN", help="only these K x N shapes (e.g. 4096x11008)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args(argv)
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"w4a16_gemm: {exc.name} is not installed (pip install 'llmc[kernels]'); nothing to measure.")
        return 0
    if not torch.cuda.is_available():
        print("w4a16_gemm: no CUDA device here; the benchmark needs an NVIDIA GPU (run benchmarks/gpu_check.sh on one).")
        return 0
    rows = bench(args)
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "group": args.group, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
