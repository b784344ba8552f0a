"""AWQ and GPTQ vs RTN on SmolLM2-135M: time, peak memory and WikiText-2 perplexity in one table.

Each variant is one ``llmc run`` of ``configs/quickstart/awq_w4g64_smollm2.yml`` (GPTQ variants:
``gptq_w4g64_smollm2.yml``, C4 random windows, quant_out) in its own process
(so peak RSS is that variant's), with overrides; the numbers are read back from its
``results.json``. RTN runs in the same invocation, so the time and memory ratios compare like with
like on whatever load the machine has.

    LLMC_DATA=../shared/data python benchmarks/awq_speed.py            # all variants, 21 windows
    python benchmarks/awq_speed.py --windows 4 --only rtn-w4 awq-w4-16  # a quick look
    python benchmarks/awq_speed.py --only rtn-w4 gptq-w4-128 gptq-w4-128-act  # GPTQ rows
    python benchmarks/awq_speed.py --windows 1 --only awq-w4-16 awq-w4-16-fp32  # search_dtype auto vs float32
    python benchmarks/awq_speed.py --no-transformed --only awq-w4-16 awq-w4-16-fp32 awq-w4-16-c2f  # + alpha_search

The table's first lines name the CPU (and GPU) and the dtype ``search_dtype: auto`` picks there.

Columns: ``method`` time is the AWQ transform stage (calibration search, clipping included);
``run s`` is the whole process (model load and evaluations included); ``peak MB`` is the process's
peak RSS (evaluations included), ``meth MB`` the method stage's own peak RSS (calibration and
search, with the model resident; each stage records its own peak on Linux); ``gap`` is the share of the RTN-to-fp32 perplexity gap that the variant closes;
``x RTN time`` compares the process time without the evaluations (load + method), ``x RTN mem``
the peak RSS, each against RTN at the same bit width.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart" / "awq_w4g64_smollm2.yml"
GPTQ_CONFIG = ROOT / "configs" / "quickstart" / "gptq_w4g64_smollm2.yml"

# name: (method, bit, calibration samples, weight clipping)
VARIANTS = {
    "rtn-w4": ("RTN", 4, 0, False),
    "awq-w4-16": ("Awq", 4, 16, True),
    "awq-w4-16-fp32": ("Awq", 4, 16, True),
    "awq-w4-16-c2f": ("Awq", 4, 16, True),
    "awq-w4-128": ("Awq", 4, 128, True),
    "rtn-w3": ("RTN", 3, 0, False),
    "awq-w3-16": ("Awq", 3, 16, True),
    "awq-w3-128": ("Awq", 3, 128, True),
    "gptq-w4-128": ("GPTQ", 4, 128, False),
    "gptq-w4-128-act": ("GPTQ", 4, 128, False),
    "gptq-w3-128": ("GPTQ", 3, 128, False),
    "gptq-w3-128-act": ("GPTQ", 3, 128, False),
}
# Overrides beyond the tuple: the default search_dtype (auto) against an explicit float32, to
# check that auto's choice costs nothing on this machine.
# coarse_to_fine: the alpha search that measures 9 of the 20 grid points, against the full grid.
EXTRA = {"awq-w4-16-fp32": ["quant.special.search_dtype=float32"], "awq-w4-16-c2f": ["quant.special.alpha_search=coarse_to_fine"]}
# GPTQ variants: act-order (with static groups, so the AWQ-GEMM layout holds) or columns in order.
GPTQ_ACTORDER = {name: name.endswith("-act") for name in VARIANTS if name.startswith("gptq")}


def run_variant(name: str, windows: int, out: Path, positions: list[str]) -> dict:
    method, bit, samples, clip = VARIANTS[name]
    overrides = [
        f"save.save_path={out / name}",
        "save.overwrite=true",
        f"eval.num_samples={windows}",
        f"eval.eval_pos=[{', '.join(positions)}]",
        f"quant.method={method}",
        f"quant.weight.bit={bit}",
    ]
    config = CONFIG
    if method == "RTN":
        overrides += ["quant.special={}", "calib=null"]
    elif method == "GPTQ":
        act = str(GPTQ_ACTORDER[name]).lower()
        config = GPTQ_CONFIG
        overrides += [f"calib.n_samples={samples}", f"quant.special.actorder={act}", f"quant.special.static_groups={act}"]
    else:
        # clip_version v2 clamps at quantization time: the transformed float model stays exact.
        overrides += [f"calib.n_samples={samples}", f"quant.special.weight_clip={str(clip).lower()}", "quant.special.clip_version=v2"]
    overrides += EXTRA.get(name, [])
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmc_core", "run", "-q", str(config), *overrides], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    payload = json.loads((out / name / "results.json").read_text())
    ppl = {r["position"]: r["value"] for r in payload["results"]}
    stages = payload["stages"]
    method_s = sum(s["seconds"] for s in stages if s["stage"].endswith("transform") or s["stage"] == "quantize")
    eval_s = sum(s["seconds"] for s in stages if s["stage"].startswith("eval"))
    peak = max(s["peak_rss_mb"] for s in stages)
    # the method stage's own peak (llmc resets the peak at each stage on Linux)
    method_peak = max((s["peak_rss_mb"] for s in stages if s["stage"].endswith("transform")), default=None)
    return {"name": name, "method": method, "bit": bit, "samples": samples, "clip": clip, "method_s": method_s, "run_s": wall, "work_s": wall - eval_s, "peak_mb": peak, "method_peak_mb": method_peak, **ppl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=21, help="WikiText-2 test windows of 2048 tokens (default 21)")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="variants to run (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the runs' outputs (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here (after each variant)")
    ap.add_argument("--no-transformed", action="store_true", help="skip the transformed-position evaluation of the first AWQ variant")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json and run only the missing variants")
    args = ap.parse_args()
    os.environ.setdefault("LLMC_DATA", str(ROOT.parent / "shared" / "data"))
    out = args.out or Path(tempfile.mkdtemp(prefix="awq_speed_"))
    names = args.only or list(VARIANTS)
    rows = json.loads(args.json.read_text()) if args.resume and args.json and args.json.is_file() else []
    done = {r["name"] for r in rows}
    names = [*(r["name"] for r in rows), *(n for n in names if n not in done)]
    for name in names[len(rows) :]:
        # pretrain once; transformed on the first AWQ variant (it must equal pretrain)
        first_awq = not args.no_transformed and not any(r["method"] == "Awq" for r in rows) and name.startswith("awq")
        positions = (["pretrain"] if not rows else []) + (["transformed"] if first_awq else []) + ["fake_quant"]
        row = run_variant(name, args.windows, out, positions)
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {row['method_s']:.1f} s, PPL {row['fake_quant']:.3f}", file=sys.stderr, flush=True)
        print_table(rows, args.windows, final=len(rows) == len(names))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


def machine() -> str:
    """The CPU (and GPU), and the dtype AWQ's ``search_dtype: auto`` picks for fp32 models there."""
    import platform

    import torch

    from llmc_plugins.methods.awq.precision import auto_search_dtype, fast_bf16

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")), cpu)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = f"; GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    dtype = str(auto_search_dtype(torch.float32, device)).replace("torch.", "")
    return f"CPU {cpu} ({os.cpu_count()} cores){gpu}; search_dtype auto -> {dtype} on {device} ({fast_bf16(device, None)[1]})"


def print_table(rows: list[dict], windows: int, final: bool) -> None:
    fp = next((r["pretrain"] for r in rows if "pretrain" in r), None)
    rtn = {r["bit"]: r for r in rows if r["method"] == "RTN"}
    print("" if final else "(partial)")
    print(f"SmolLM2-135M fp32, WikiText-2 test, first {windows} windows of 2048 tokens" + (f"; pretrain PPL {fp:.3f}" if fp else ""))
    print(machine())
    head = f"{'variant':<12} {'calib':>7} {'clip':>5} {'method s':>9} {'run s':>7} {'peak MB':>8} {'meth MB':>7} {'PPL':>8} {'transf.':>8} {'gap':>6} {'x RTN time':>10} {'x RTN mem':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        base = rtn.get(r["bit"])
        gap = f"{100 * (base['fake_quant'] - r['fake_quant']) / (base['fake_quant'] - fp):.0f}%" if base and fp and r is not base else "-"
        t_ratio = f"{r['work_s'] / base['work_s']:.1f}" if base else "-"
        m_ratio = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
        calib = f"{r['samples']}x512" if r["samples"] else "-"
        tr = f"{r['transformed']:.3f}" if "transformed" in r else "-"
        mp = f"{r['method_peak_mb']:.0f}" if r.get("method_peak_mb") else "-"
        print(f"{r['name']:<12} {calib:>7} {'yes' if r['clip'] else 'no':>5} {r['method_s']:>9.1f} {r['run_s']:>7.1f} {r['peak_mb']:>8.0f} {mp:>7} {r['fake_quant']:>8.3f} {tr:>8} {gap:>6} {t_ratio:>10} {m_ratio:>9}", flush=True)


if __name__ == "__main__":
    main()
