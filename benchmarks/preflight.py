"""The memory preflight's estimates against measured peaks (SmolLM2), and for large models' shapes.

    python benchmarks/preflight.py --out /work/runs/preflight            # runs llmc on SmolLM2, then prints
    python benchmarks/preflight.py --out /work/runs/preflight --skip-runs  # estimates only (and runs already there)

SmolLM2-135M (the quick-start GGUF file): RTN, AWQ and GPTQ at the quick-start settings, and AWQ
and GPTQ at 128 x 512 calibration tokens, each run's estimate (``results.json``'s ``memory``)
beside its measured peak RSS (the largest stage peak). Then, from config shapes alone (no
download, no weights), the estimates for GPTQ at 128 x 2048 tokens on bfloat16 Llama-3-8B,
Llama-3-70B and Qwen3-30B-A3B, on a CUDA device, with N = 1, 2 and 8 ranks (torchrun's
WORLD_SIZE: each rank loads the model and keeps 1/N of the calibration tokens). docs/memory.md
has the numbers and what they count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/gguf.py would shadow the gguf package that reading a .gguf header needs
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
QUICK = ROOT / "configs" / "quickstart"
GPTQ = QUICK / "gptq_w4g64_smollm2.yml"

# name -> (config, overrides); the quick-start GPTQ config is already 128 x 512
SMOLLM2_RUNS = {
    "rtn": (QUICK / "rtn_w4g64_smollm2.yml", []),
    "awq": (QUICK / "awq_w4g64_smollm2.yml", []),
    "gptq": (GPTQ, []),
    "awq_128x512": (QUICK / "awq_w4g64_smollm2.yml", ["calib.n_samples=128", "calib.seq_len=512"]),
}

# Public config.json values of each model (hidden size, layers, heads, KV heads, head size,
# intermediate / expert sizes, vocabulary); the weights are never read.
LARGE = {
    "Llama-3-8B": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)),
    "Llama-3-70B": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False)),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                                        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, vocab_size=151936, tie_word_embeddings=False)),
}


def run_smollm2(out: Path, name: str) -> None:
    cfg, overrides = SMOLLM2_RUNS[name]
    save = out / name
    if (save / "results.json").exists():
        print(f"{name}: {save}/results.json is there; not run again", flush=True)
        return
    cmd = [sys.executable, "-m", "llmc_core", "run", str(cfg), f"save.save_path={save}", "save.overwrite=true", *overrides]
    print("running:", " ".join(cmd), flush=True)
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "LLMC_DATA": os.environ.get("LLMC_DATA", str(ROOT.parent / "shared" / "data"))})


def smollm2_table(out: Path) -> list[str]:
    from llmc_core import config, preflight

    rows = ["| run | calib tokens | estimate (MB) | stage | measured peak RSS (MB) | estimate vs measured |", "|---|---|---|---|---|---|"]
    for name, (cfg_path, overrides) in SMOLLM2_RUNS.items():
        rc = config.load(cfg_path, [*overrides, f"save.save_path={out / name}", "save.overwrite=true"])
        est = preflight.estimate(rc, preflight.read_model_config(rc.model))
        tokens = f"{rc.calib.n_samples} x {rc.calib.seq_len}" if rc.needs_calibration else "-"
        measured = None
        results = out / name / "results.json"
        if results.exists():
            measured = json.loads(results.read_text()).get("memory", {}).get("measured_peak_rss_mb")
        shown = f"{measured:.0f}" if measured else "not run"
        gap = f"{(preflight.mib(est.host) - measured) / measured:+.0%}" if measured else ""
        rows.append(f"| {name} | {tokens} | {preflight.mib(est.host):.0f} | {est.host_stage} | {shown} | {gap} |")
    return rows


def large_table() -> list[str]:
    from transformers import AutoConfig

    from llmc_core import config, preflight

    rc = config.load(GPTQ, ["model.torch_dtype=bfloat16", "calib.n_samples=128", "calib.seq_len=2048", "save.save_path=/tmp/llmc-preflight-bench", "save.overwrite=true"])
    rows = ["| model | params | N | host peak (GB, all ranks) | host stage | device peak per rank (GB) | device stage | biggest device parts (GB) |", "|---|---|---|---|---|---|---|---|"]
    for name, (model_type, fields) in LARGE.items():
        hf = AutoConfig.for_model(model_type, **fields)
        params = preflight.ModelShapes.from_config(hf, 2).params()
        for ranks in (1, 2, 8):
            est = preflight.estimate(rc, hf, device="cuda", ranks=ranks)
            top = ", ".join(f"{p.name} {p.bytes / 2**30:.1f}" for p in sorted(est.device_parts, key=lambda p: -p.bytes)[:3])
            rows.append(f"| {name} | {params / 1e9:.1f} B | {ranks} | {est.host / 2**30:.1f} | {est.host_stage} | {est.device / 2**30:.1f} | {est.device_stage} | {top} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/llmc-preflight"), help="where the SmolLM2 runs write (and are read back from)")
    ap.add_argument("--skip-runs", action="store_true", help="print the estimates only; runs already in --out are still compared")
    ap.add_argument("--runs", nargs="*", default=list(SMOLLM2_RUNS), choices=list(SMOLLM2_RUNS), help="which SmolLM2 runs to make")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_runs:
        for name in args.runs:
            run_smollm2(args.out, name)
    print("\n".join(["## SmolLM2-135M (float32, CPU)", "", *smollm2_table(args.out), "", "## GPTQ at 128 x 2048 tokens, bfloat16, CUDA", "", *large_table()]))


if __name__ == "__main__":
    main()
