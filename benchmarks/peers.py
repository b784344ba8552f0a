"""llmc's GPTQ next to llm-compressor's on SmolLM2-135M: time and WikiText-2 perplexity, one table.

NOT RUN YET: written without a machine that could install llm-compressor (a ~2 GB venv with its
own torch); expect to fix small API details on the first run. What it does, in one invocation:

1. converts the GGUF model once to a Hugging Face folder (``OUT/hf_model``), which both tools read;
2. draws the calibration ids once with llmc's own C4 ``random_window`` recipe (128 x 512 tokens,
   seed 42) and writes them to ``OUT/calib_ids.json``; llmc's runs draw the same ids from the same
   config (the recipe is deterministic), llm-compressor gets them from the file;
3. builds ``OUT/peer-venv`` with ``llmcompressor==LLMCOMPRESSOR_VERSION`` (pinned; ``--venv`` to
   reuse one) and runs its ``oneshot`` + ``GPTQModifier`` (W4A16 / W3A16, asymmetric, group 64,
   dampening 0.01, block 128, act-order "weight" = llmc's ``actorder`` with ``static_groups``),
   then writes each quantized model as dense fake-quantized weights (codes x scales recomputed
   from the observer's ``weight_scale`` / ``weight_zero_point``, idempotent if llm-compressor
   already wrote fake-quantized weights) with no ``quantization_config``, so plain transformers
   loads it;
4. runs ``llmc run`` with GPTQ on the same folder and ids (``quant_out: true``, as
   llm-compressor's sequential pipeline feeds each layer the quantized previous layers' outputs),
   and llmc's PPL evaluator (``eval_pos: [pretrain]`` on the peer's folder) on every output.

    LLMC_DATA=../shared/data python benchmarks/peers.py            # 21 windows, w4 and w3
    python benchmarks/peers.py --windows 4 --bits 4 --venv /opt/peer-venv

Columns: ``quant s`` is llmc's GPTQ transform stage / llm-compressor's ``oneshot`` call (both
exclude loading and evaluation); ``x llmc`` divides the peer's figure by llmc's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart" / "gptq_w4g64_smollm2.yml"
LLMCOMPRESSOR_VERSION = "0.6.0"
SEED, N_SAMPLES, SEQ_LEN, GROUP = 42, 128, 512, 64

PEER_SCRIPT = textwrap.dedent(
    '''
    import json, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmcompressor import oneshot

    model_dir, ids_file, out_dir, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    ids = json.load(open(ids_file))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    recipe = f"""
    quant_stage:
      quant_modifiers:
        GPTQModifier:
          dampening_frac: 0.01
          block_size: 128
          ignore: ["lm_head"]
          config_groups:
            group_0:
              targets: ["Linear"]
              weights: {{num_bits: {bits}, type: int, symmetric: false, strategy: group, group_size: {group}, actorder: weight}}
    """
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=len(ids[0]), num_calibration_samples=len(ids))
    seconds = time.perf_counter() - start
    qmax = 2 ** bits - 1
    with torch.no_grad():
        for name, m in model.named_modules():
            scale = getattr(m, "weight_scale", None)
            if not isinstance(m, torch.nn.Linear) or scale is None:
                continue
            zp = getattr(m, "weight_zero_point", torch.zeros_like(scale)).float()
            w = m.weight.float()
            s = scale.float().repeat_interleave(group, dim=1)[:, : w.shape[1]]
            z = zp.repeat_interleave(group, dim=1)[:, : w.shape[1]]
            q = torch.clamp(torch.round(w / s) + z, 0, qmax)
            m.weight.copy_(((q - z) * s).to(m.weight.dtype))
            for extra in ("weight_scale", "weight_zero_point", "weight_g_idx"):
                if hasattr(m, extra):
                    delattr(m, extra)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    import llmcompressor
    print(json.dumps({"seconds": seconds, "version": llmcompressor.__version__}))
    '''
)


def llmc(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "llmc_core", "run", "-q", *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"llmc run {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def ppl_of(save_path: Path, position: str) -> float:
    payload = json.loads((save_path / "results.json").read_text())
    return next(r["value"] for r in payload["results"] if r["position"] == position)


def stage_seconds(save_path: Path, suffix: str) -> float:
    payload = json.loads((save_path / "results.json").read_text())
    return sum(s["seconds"] for s in payload["stages"] if s["stage"].endswith(suffix))


def convert(out: Path) -> Path:
    """The GGUF model as a HF folder (float32), once."""
    target = out / "hf_model"
    if (target / "config.json").is_file():
        return target
    from llmc_core import config

    cfg = config.load(CONFIG, [f"save.save_path={out / 'convert'}", "save.overwrite=true"])
    model, tok = cfg.model_family().load(cfg.model)
    model.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)
    return target


def calibration_ids(out: Path, hf: Path) -> Path:
    """llmc's calibration samples for CONFIG (C4, random_window, seed 42) with the HF folder's
    tokenizer, as token id lists: what ``llmc run`` on that folder draws."""
    from llmc_core import config
    from llmc_core.plugins import get_manager

    cfg = config.load(CONFIG, [f"save.save_path={out / 'convert'}", "save.overwrite=true", f"model.path={hf}", "model.type=llama"])
    c = cfg.calib
    manager = get_manager()
    _, tok = cfg.model_family().load(cfg.model)
    rows = manager.get("dataset", c.name, "calib.name")().read_rows(c.path, c.download, "calib", "calib.path")
    samples = manager.get("preproc", c.preproc, "calib.preproc")().samples(rows, tok, c.n_samples, c.seq_len, c.seed)
    path = out / "calib_ids.json"
    path.write_text(json.dumps([s[0].tolist() for s in samples]))
    return path


def peer_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"llmcompressor=={LLMCOMPRESSOR_VERSION}"], check=True)
    return python


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=21)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--venv", type=Path, default=None, help="llm-compressor's venv (built with the pinned version if missing)")
    args = ap.parse_args()
    os.environ.setdefault("LLMC_DATA", str(ROOT.parent / "shared" / "data"))
    out = args.out or Path(tempfile.mkdtemp(prefix="peers_"))
    hf = convert(out)
    ids = calibration_ids(out, hf)
    python = peer_venv(args.venv or out / "peer-venv")
    common = [f"model.path={hf}", "model.type=llama", f"eval.num_samples={args.windows}"]
    rows = []
    for bit in args.bits:
        mine = out / f"llmc_w{bit}"
        start = time.perf_counter()
        llmc([str(CONFIG), *common, f"save.save_path={mine}", "save.overwrite=true", f"quant.weight.bit={bit}", "eval.eval_pos=[pretrain, fake_quant]"])
        rows.append({"tool": "llmc", "bit": bit, "quant_s": stage_seconds(mine, "transform"), "run_s": time.perf_counter() - start, "ppl": ppl_of(mine, "fake_quant"), "fp": ppl_of(mine, "pretrain")})
        peer = out / f"peer_w{bit}"
        start = time.perf_counter()
        proc = subprocess.run([str(python), "-c", PEER_SCRIPT, str(hf), str(ids), str(peer / "model"), str(bit), str(GROUP)], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"llm-compressor w{bit} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        wall = time.perf_counter() - start
        llmc([str(CONFIG), *common, f"model.path={peer / 'model'}", f"save.save_path={peer / 'eval'}", "save.overwrite=true", "eval.eval_pos=[pretrain]", "quant=null", "calib=null", "save.save_fake=false"])
        rows.append({"tool": f"llm-compressor {info['version']}", "bit": bit, "quant_s": info["seconds"], "run_s": wall, "ppl": ppl_of(peer / "eval", "pretrain")})
    print(f"SmolLM2-135M fp32 (HF folder from the GGUF), GPTQ W{{4,3}}A16 asym g{GROUP}, {N_SAMPLES}x{SEQ_LEN} C4 ids shared; WikiText-2 test, first {args.windows} windows; fp32 PPL {rows[0]['fp']:.3f}")
    head = f"{'tool':<22} {'bits':>4} {'quant s':>8} {'PPL':>8} {'x llmc time':>11} {'x llmc PPL':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ref = next(x for x in rows if x["tool"] == "llmc" and x["bit"] == r["bit"])
        print(f"{r['tool']:<22} {r['bit']:>4} {r['quant_s']:>8.1f} {r['ppl']:>8.3f} {r['quant_s'] / ref['quant_s']:>11.2f} {r['ppl'] / ref['ppl']:>10.3f}")


if __name__ == "__main__":
    main()
