"""Weight + activation schemes on SmolLM2-135M (fp32): WikiText-2 test PPL of each scheme's
``fake_quant`` model, through ``llmc run`` with ``save_vllm``, and the same windows measured on the
exported compressed-tensors folder loaded by transformers + compressed-tensors (their quantized
forward, activations included), plus an independent fake-quant loop written here.

    LLMC_DATA=../shared/data python benchmarks/schemes.py --out /work/runs/schemes [--windows 4] [--methods rtn gptq]

Prints one table (CPU named) and keeps ``rows.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import convert, cpu_name, llmc, ppl_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMC_DATA", ROOT.parent / "shared" / "data"))
# (row name, config overrides); SmolLM2's hidden size 576 takes group sizes 64 / 32 / 16 and 64-wide blocks
FP8 = "{quant_type: float-quant, bit: e4m3, symmetric: true"
SCHEMES = [
    ("FP8_DYNAMIC", ["quant.scheme=FP8_DYNAMIC"]),
    ("INT8 W8A8 (per-channel / per-token)", ["quant.scheme=W8A8"]),
    ("FP8 static per-tensor act", ["quant.scheme=FP8"]),
    ("FP8_BLOCK (64x64, act g64)", [f"quant.weight={FP8}, granularity: per_block, block_size: [64, 64]}}", f"quant.act={FP8}, granularity: per_group, group_size: 64}}"]),
    ("W4A8 (int4 g64, int8 per-token)", ["quant.weight={bit: 4, symmetric: true, granularity: per_group, group_size: 64}", "quant.act={bit: 8, symmetric: true, granularity: per_token}"]),
    ("FP8_DYNAMIC + FP8 KV cache", ["quant.scheme=FP8_DYNAMIC", f"quant.kvcache={FP8}, granularity: per_tensor}}"]),
    ("FP8 weights only", [f"quant.weight={FP8}, granularity: per_channel}}"]),
    ("NVFP4", ["quant.scheme=NVFP4"]),
    ("MXFP4", ["quant.scheme=MXFP4"]),
]


def eval_windows(model, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    """PPL of the first ``windows`` windows of ``seq_len`` tokens (llmc's ppl evaluator's rule)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(windows):
            x = ids[:, i * seq_len : (i + 1) * seq_len]
            logits = model(x).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            nll, count = nll + float(loss), count + x.shape[1] - 1
    return math.exp(nll / count)


def eval_ids(hf: Path) -> torch.Tensor:
    """WikiText-2 test as llmc's ppl evaluator tokenizes it: the dataset's rows joined with "\n\n"."""
    from transformers import AutoTokenizer

    from llmc_core.plugins import get_manager

    rows = get_manager().get("dataset", "wikitext2", "eval.name")().read_rows(str(DATA / "wikitext2" / "wiki.test.raw"), False, "eval", "eval.path")
    tok = AutoTokenizer.from_pretrained(hf, trust_remote_code=False)
    return tok("\n\n".join(rows), return_tensors="pt").input_ids


BF16_WINDOWS = 4  # the most windows the bf16 loader runs on a CPU without bf16 matmul units


def bf16_only(folder: Path) -> bool:
    """compressed-tensors decompresses FP4 folders to bf16 (and refuses a float cast of the model)."""
    return "fp4" in json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get("format", "")


def loader_ppl(folder: Path, ids: torch.Tensor, windows: int) -> float:
    """The folder loaded by transformers + compressed-tensors (its own quantized forward)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16_only(folder) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False).eval()
    return eval_windows(model, ids, 2048, windows)


# -- an independent fake-quant loop: torch only, none of llmc's code -------------------------------


def _fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).round().clamp(-128, 127) * scale


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.finfo(torch.float32).eps, s)


def _int(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return (x / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def _groups(x: torch.Tensor, size: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the FP4 values; an even index is an even mantissa


def _e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 value by table lookup (ties to the even-mantissa neighbour, saturating at 6)."""
    a = x.abs().clamp(max=6.0).unsqueeze(-1)
    dist = (a - E2M1).abs()
    best = dist.min(-1, keepdim=True).values
    tied = dist == best
    # of the (at most two) nearest values take the even index when there is a tie
    idx = torch.where(tied.sum(-1) > 1, (tied & (torch.arange(8) % 2 == 0)).float().argmax(-1), dist.argmin(-1))
    return E2M1[idx] * x.sign()


def _nvfp4(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """NVFP4: a per-tensor fp32 global scale 448*6/amax over fp8 e4m3 scales per 16 values."""
    gs = 448 * 6 / amax.float().clamp(min=torch.finfo(torch.float32).tiny)
    g = _groups(x, 16)
    s = (gs * (g.abs().amax(-1, keepdim=True) / 6)).clamp(max=448).to(torch.float8_e4m3fn).float()
    eff = torch.where(s == 0, 0.125, s) / gs
    return (_e2m1(g / eff) * eff).reshape(x.shape)


def _mxfp4(x: torch.Tensor) -> torch.Tensor:
    """MXFP4: power-of-two scales per 32 values, 2**(e - 2) with e = floor(log2 amax), one more when
    amax's significand is >= 1.75 (compressed-tensors' rounding of amax to a power of two)."""
    g = _groups(x, 32)
    amax = g.abs().amax(-1, keepdim=True)
    e = torch.floor(torch.log2(amax))
    e = torch.where(amax / 2**e >= 1.75, e + 1, e)
    scale = torch.where(amax == 0, 2.0**-127, 2.0 ** (e - 2))
    return (_e2m1(g / scale) * scale).reshape(x.shape)


def _fp8_block(w: torch.Tensor, size: int) -> torch.Tensor:
    o, i = w.shape
    b = w.reshape(o // size, size, i // size, size)
    return _fp8(b, _safe(b.abs().amax((1, 3), keepdim=True) / 448)).reshape(o, i)


def _fp8_group(x: torch.Tensor, size: int) -> torch.Tensor:
    g = _groups(x, size)
    return _fp8(g, _safe(g.abs().amax(-1, keepdim=True) / 448)).reshape(x.shape)


INDEPENDENT = {  # row name -> (weight rule, activation rule or None); s: the static input scale llmc calibrated
    "FP8 weights only": (lambda w: _fp8(w, _safe(w.abs().amax(1, keepdim=True) / 448)), None),
    "FP8_DYNAMIC": (lambda w: _fp8(w, _safe(w.abs().amax(1, keepdim=True) / 448)), lambda x, s: _fp8(x, _safe(x.abs().amax(-1, keepdim=True) / 448))),
    "INT8 W8A8 (per-channel / per-token)": (lambda w: _int8(w, _safe(w.abs().amax(1, keepdim=True) / 127)), lambda x, s: _int8(x, _safe(x.abs().amax(-1, keepdim=True) / 127))),
    "FP8 static per-tensor act": (lambda w: _fp8(w, _safe(w.abs().amax() / 448)), lambda x, s: _fp8(x, s)),
    "FP8_BLOCK (64x64, act g64)": (lambda w: _fp8_block(w, 64), lambda x, s: _fp8_group(x, 64)),
    # NVFP4's static input scale in llmc_qparams is the calibrated max |x| the global scale is made of
    "NVFP4": (lambda w: _nvfp4(w, w.abs().amax()), lambda x, s: _nvfp4(x, s)),
    "MXFP4": (_mxfp4, lambda x, s: _mxfp4(x)),
    "W4A8 (int4 g64, int8 per-token)": (lambda w: _int(_groups(w, 64), _safe(_groups(w, 64).abs().amax(-1, keepdim=True) / 7), 4).reshape(w.shape), lambda x, s: _int8(x, _safe(x.abs().amax(-1, keepdim=True) / 127))),
}


def independent_ppl(name: str, hf: Path, ids: torch.Tensor, windows: int, static_scales: dict) -> float | None:
    """PPL of the float model with every decoder linear's weight and input quantized by the rules
    above (static input scales: the ones llmc calibrated, read from its fake_quant folder)."""
    from transformers import AutoModelForCausalLM

    if name not in INDEPENDENT:
        return None
    wq, aq = INDEPENDENT[name]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, trust_remote_code=False).eval()
    for lname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in lname:
            with torch.no_grad():
                mod.weight.copy_(wq(mod.weight.float()))
            if aq is not None:
                s = static_scales.get(lname)
                mod.register_forward_pre_hook(lambda m, a, s=s: (aq(a[0].float(), s).to(a[0].dtype),))
    return eval_windows(model, ids, 2048, windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=["rtn"])
    ap.add_argument("--samples", type=int, default=32, help="calibration samples of 512 tokens (GPTQ, static scales)")
    ap.add_argument("--only", nargs="*", help="row names to run (default: all)")
    ap.add_argument("--no-loader", action="store_true", help="skip loading each exported folder with transformers")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hf = convert(args.out)
    ids = eval_ids(hf)
    common = [
        f"model.path={hf}", "model.type=auto", f"eval.num_samples={args.windows}", f"eval.path={DATA / 'wikitext2' / 'wiki.test.raw'}",
        "calib={name: c4, path: " + str(DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl") + f", n_samples: {args.samples}, seq_len: 512, preproc: random_window, seed: 42}}",
        "save.save_vllm=true", "save.save_fake=true", "save.overwrite=true", "quant.special={}",
    ]
    cfg = ROOT / "configs" / "quickstart" / "rtn_w4g64_smollm2.yml"
    fp_dir = args.out / "fp32"
    fp_file = args.out / "fp32.json"  # one fp32 measurement per --out and window count: later invocations reuse it
    if fp_file.is_file() and json.loads(fp_file.read_text())["windows"] == args.windows:
        fp, fp_check = (json.loads(fp_file.read_text())[k] for k in ("llmc", "loop"))
    else:
        llmc([str(cfg), *common, f"save.save_path={fp_dir}", "eval.eval_pos=[pretrain]", "quant=null", "calib=null", "save.save_vllm=false", "save.save_fake=false"])
        fp = ppl_of(fp_dir, "pretrain")
        fp_check = eval_windows(__import__("transformers").AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, trust_remote_code=False).eval(), ids, 2048, args.windows)
        fp_file.write_text(json.dumps({"windows": args.windows, "llmc": fp, "loop": fp_check}))
    print(f"fp32: llmc {fp:.4f}, this script's loop {fp_check:.4f}", flush=True)
    rows = []
    for method in args.methods:
        for name, overrides in SCHEMES:
            if args.only and name not in args.only:
                continue
            slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
            save = args.out / f"{method}_{slug}"
            extra = ["quant.weight=null"] if any(o.startswith("quant.scheme=") for o in overrides) else []
            extra += [f"quant.method={method.upper()}"] + (["quant.special={forward_dtype: float32}"] if method == "gptq" else [])
            llmc([str(cfg), *common, *extra, *overrides, f"save.save_path={save}", "eval.eval_pos=[fake_quant]"], save / "llmc.log" if save.exists() else None)
            row = {"method": method, "scheme": name, "ppl": ppl_of(save, "fake_quant")}
            if not args.no_loader and method == "rtn":
                if bf16_only(save / "vllm_quant_model") and args.windows > BF16_WINDOWS:
                    row["loader_note"] = f"not run: compressed-tensors decompresses FP4 to bf16, ~44x slower than fp32 on an AVX2 CPU; measured at {BF16_WINDOWS} windows"
                else:
                    row["loader_ppl"] = loader_ppl(save / "vllm_quant_model", ids, args.windows)
            if method == "rtn":
                from safetensors.torch import load_file

                qp = load_file(str(save / "fake_quant_model" / "llmc_qparams.safetensors"))
                row["independent_ppl"] = independent_ppl(name, hf, ids, args.windows, {k.removesuffix(".input_scale"): v for k, v in qp.items() if k.endswith(".input_scale")})
            rows.append(row)
            (args.out / "rows.json").write_text(json.dumps({"fp32": fp, "rows": rows}, indent=2))
            print(row, flush=True)
    print(f"\nSmolLM2-135M fp32 (HF folder from the GGUF) on {cpu_name()}; WikiText-2 test, first {args.windows} windows of 2048; fp32 PPL {fp:.3f}")
    print("| method | scheme | llmc fake_quant PPL | vs fp32 | independent loop PPL | rel. diff | transformers + compressed-tensors PPL | rel. diff |")
    print("|---|---|---|---|---|---|---|---|")

    def rel(x, r):
        return ("", "") if x is None else (f"{x:.3f}", f"{(x - r['ppl']) / r['ppl'] * 100:+.3f}%")

    for r in rows:
        ind, lp = rel(r.get("independent_ppl"), r), rel(r.get("loader_ppl"), r)
        lp = ("not run (bf16 only, see loader_note)", "") if "loader_note" in r else lp
        print(f"| {r['method']} | {r['scheme']} | {r['ppl']:.3f} | {(r['ppl'] - fp) / fp * 100:+.2f}% | {ind[0]} | {ind[1]} | {lp[0]} | {lp[1]} |")


if __name__ == "__main__":
    main()
