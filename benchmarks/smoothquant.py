"""SmoothQuant and recipes on SmolLM2-135M (fp32): how much of RTN's gap to fp32 each recipe closes,
per weight+activation scheme, all through ``llmc run`` on the same calibration data and windows.

Rows per scheme: RTN, GPTQ, SmoothQuant alone (its weights rounded to nearest, as ModelTC's
SmoothQuant does), ``[SmoothQuant, GPTQ]`` with the fixed alpha, and with ``--search`` the same
recipe with the per-block alpha search. ``gap closed`` = (RTN - row) / (RTN - fp32).

    LLMC_DATA=../shared/data python benchmarks/smoothquant.py --out /tmp/sq [--windows 21] [--samples 128]
        [--schemes w8a8-static w8a8 fp8-dynamic] [--alpha 0.8] [--search]

Prints one table (CPU named) and keeps ``rows.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import convert, cpu_name, llmc, method_stages, ppl_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMC_DATA", ROOT.parent / "shared" / "data"))
INT8_CHANNEL = "quant.weight={bit: 8, symmetric: true, granularity: per_channel}"
SCHEMES = {
    "w8a8-static": ("INT8 W8A8, static per-tensor activations", [INT8_CHANNEL, "quant.act={bit: 8, symmetric: true, granularity: per_tensor, static: true}"]),
    "w8a8-static-mse": ("INT8 W8A8, static per-tensor activations, mse observer", [INT8_CHANNEL, "quant.act={bit: 8, symmetric: true, granularity: per_tensor, static: true, calib_algo: mse}"]),
    "w8a8": ("INT8 W8A8, per-token activations", ["quant.scheme=W8A8", "quant.weight=null"]),
    "fp8-dynamic": ("FP8_DYNAMIC", ["quant.scheme=FP8_DYNAMIC", "quant.weight=null"]),
}


def recipes(alpha: float, search: bool) -> list[tuple[str, list[str]]]:
    sq = f"SmoothQuant: {{alpha: {alpha}}}"
    rows = [
        ("RTN", ["quant.method=RTN", "quant.special={}"]),
        ("GPTQ", ["quant.method=GPTQ", "quant.special={forward_dtype: float32}"]),
        (f"SmoothQuant (a={alpha})", ["quant.method=SmoothQuant", f"quant.special={{alpha: {alpha}}}"]),
        (f"[SmoothQuant (a={alpha}), GPTQ]", ["quant.method=[SmoothQuant, GPTQ]", f"quant.special={{{sq}, GPTQ: {{forward_dtype: float32}}}}"]),
    ]
    if search:
        rows.append(("[SmoothQuant (alpha search), GPTQ]", ["quant.method=[SmoothQuant, GPTQ]", "quant.special={SmoothQuant: {alpha_search: true}, GPTQ: {forward_dtype: float32}}"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=21)
    ap.add_argument("--samples", type=int, default=128, help="calibration samples of 512 C4 tokens")
    ap.add_argument("--schemes", nargs="+", choices=sorted(SCHEMES), default=["w8a8-static", "w8a8", "fp8-dynamic"])
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--search", action="store_true", help="also the recipe with SmoothQuant's per-block alpha search")
    ap.add_argument("--only", nargs="*", help="recipe row names to run (default: all)")
    ap.add_argument("--reuse", action="store_true", help="keep rows already finished in --out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hf = convert(args.out)
    cfg = ROOT / "configs" / "quickstart" / "gptq_w4g64_smollm2.yml"
    common = [
        f"model.path={hf}", "model.type=auto", f"eval.num_samples={args.windows}", f"eval.path={DATA / 'wikitext2' / 'wiki.test.raw'}",
        "calib={name: c4, path: " + str(DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl") + f", n_samples: {args.samples}, seq_len: 512, preproc: random_window, seed: 42}}",
        "save.save_fake=false", "save.overwrite=true", "quant.quant_out=false",
    ]
    fp_dir = args.out / "fp32"
    if not (args.reuse and (fp_dir / "results.json").is_file()):
        llmc([str(cfg), *common, f"save.save_path={fp_dir}", "eval.eval_pos=[pretrain]", "quant=null", "calib=null"])
    fp = ppl_of(fp_dir, "pretrain")
    print(f"fp32 {fp:.4f}", flush=True)
    rows = []
    for key in args.schemes:
        label, scheme = SCHEMES[key]
        for name, method in recipes(args.alpha, args.search):
            if args.only and name not in args.only:
                continue
            save = args.out / ("".join(c if c.isalnum() else "_" for c in f"{key}_{name}")[:60])
            if not (args.reuse and (save / "results.json").is_file()):
                llmc([str(cfg), *common, *scheme, *method, f"save.save_path={save}", "eval.eval_pos=[fake_quant]"], None)
            seconds, peak = method_stages(save)
            rows.append({"scheme": label, "recipe": name, "ppl": ppl_of(save, "fake_quant"), "seconds": seconds, "peak_mb": peak})
            (args.out / "rows.json").write_text(json.dumps({"fp32": fp, "rows": rows}, indent=2))
            print(rows[-1], flush=True)
    print(f"\nSmolLM2-135M fp32 (HF folder from the GGUF) on {cpu_name()}; {args.samples} x 512 C4 calibration samples (random_window, seed 42); WikiText-2 test, first {args.windows} windows of 2048; fp32 PPL {fp:.3f}")
    print("| scheme | recipe | fake_quant PPL | vs fp32 | gap to fp32 closed (vs RTN) | method s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rtn = next(x["ppl"] for x in rows if x["scheme"] == r["scheme"] and x["recipe"] == "RTN") if any(x["scheme"] == r["scheme"] and x["recipe"] == "RTN" for x in rows) else None
        closed = f"{(rtn - r['ppl']) / (rtn - fp) * 100:.0f}%" if rtn is not None and r["recipe"] != "RTN" and rtn != fp else ""
        print(f"| {r['scheme']} | {r['recipe']} | {r['ppl']:.3f} | {(r['ppl'] - fp) / fp * 100:+.2f}% | {closed} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
