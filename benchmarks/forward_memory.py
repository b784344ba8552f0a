"""Peak memory of one block forward over a whole calibration batch, sliced or not.

``calib.bs: -1`` puts every calibration sample in one batch; ``BlockContext.forward`` slices a
batch into calls of at most ``blockwise.FORWARD_TOKENS`` tokens. Each setting runs in its own
process (so ``ru_maxrss`` is that setting's), on SmolLM2-135M's block 0 with random token ids:

    python benchmarks/forward_memory.py --model /tmp/peers/hf_model --samples 128 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM
from llmc_core import blockwise
from llmc_core.testing import block_context

path, samples, seq_len, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
blockwise.FORWARD_TOKENS = tokens
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ctx = block_context(model, index=0, n_samples=samples, seq_len=seq_len)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
with torch.no_grad():
    out = ctx.forward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens_per_call": tokens, "peak_mb": peak, "before_mb": before, "seconds": seconds, "checksum": float(out[0].double().sum())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model folder")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    total = args.samples * args.seq_len
    rows = []
    for tokens in (total, 16384):
        proc = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.samples), str(args.seq_len), str(tokens)], capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"block 0 of {args.model}, one batch of {args.samples} x {args.seq_len} tokens")
    print(f"{'tokens/call':>11} {'peak RSS MB':>11} {'before MB':>9} {'forward s':>9} {'output sum':>14}")
    for r in rows:
        print(f"{r['tokens_per_call']:>11} {r['peak_mb']:>11.0f} {r['before_mb']:>9.0f} {r['seconds']:>9.1f} {r['checksum']:>14.4f}")


if __name__ == "__main__":
    main()
