#!/usr/bin/env bash
# One GPU session, one script (under 10 minutes on an H100/H200; every step has its own timeout):
# the W4A16 kernel tests, the benchmark tables (float16 and bfloat16, group 128), a tile sweep on
# one shape.
# Needs a CUDA build of torch and triton on the machine; writes its logs and JSON to $OUT (or /tmp/llmc_gpu_check).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/llmc_gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

python - <<'PY' 2>&1 | tee "$out/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton MISSING: pip install triton")
PY
python -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu_check: needs CUDA torch and triton"; exit 1; }

status=0
echo "== kernel tests"
timeout 200 python -m pytest tests/test_w4a16_kernel.py -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.txt" | tail -25 || status=1
echo "== benchmark float16"
timeout 120 python benchmarks/w4a16_gemm.py --json "$out/w4a16_fp16.json" 2>&1 | tee "$out/bench_fp16.txt" || status=1
echo "== benchmark bfloat16"
timeout 90 python benchmarks/w4a16_gemm.py --dtype bfloat16 --json "$out/w4a16_bf16.json" 2>&1 | tee "$out/bench_bf16.txt" || status=1
echo "== tile sweep 4096x11008"
timeout 180 python benchmarks/w4a16_gemm.py --sweep --shapes 4096x11008 --json "$out/w4a16_sweep.json" 2>&1 | tee "$out/sweep.txt" || status=1
exit $status
