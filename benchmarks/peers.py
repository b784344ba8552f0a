"""llmc next to llm-compressor on SmolLM2-135M, in one run: AWQ and GPTQ (and, with ``--schemes``,
weight + activation schemes), wall time, peak memory, PPL.

What one invocation does:

1. converts the GGUF model once to a Hugging Face folder (``OUT/hf_model``, float32), which both
   tools read;
2. draws the calibration ids once with llmc's C4 ``random_window`` recipe (``--samples`` x 512
   tokens, seed 42) and writes them to ``OUT/calib_ids.json``; llmc's runs (AWQ's too, with
   ``calib.preproc=random_window``) draw the same ids with the same recipe, seed and tokenizer
   (the recipe is deterministic), llm-compressor reads them from the file;
3. builds ``OUT/peer-venv`` (or uses ``--venv``; one whose llmcompressor is already
   ``LLMCOMPRESSOR_VERSION`` is used as it is) with torch 2.13.0 (the CPU wheel on this disk), then
   ``llmcompressor==LLMCOMPRESSOR_VERSION`` with the pins it brings itself (transformers 5.15-5.17,
   compressed-tensors 0.19.0, numpy 2), nothing pinned here;
4. per method and bit width: ``llmc run`` (AWQ: the quick-start recipe, scales + clipping;
   GPTQ: the quick-start recipe, act-order with static groups, ``quant_out``, ``calib_algo: mse``
   weighted by ``diag H``; ``--variant gptq:minmax:quant.weight.calib_algo=minmax`` adds the
   reference's range rule) and llm-compressor's ``oneshot`` with ``GPTQModifier`` (dampening
   0.01, block 128, ``actorder: weight`` = llmc's act-order with static groups) or
   ``AWQModifier`` (its defaults: duo scaling, 20 grid points, no clipping; in 0.14 it only
   searches and folds the scales, so a ``QuantizationModifier`` after it rounds the weights,
   min-max), both W{bits}A16 asymmetric, group 64, ``lm_head`` left in float;
5. writes llm-compressor's result as dense fake-quantized weights (compressed-tensors' own
   ``fake_quantize`` with each layer's ``weight_scale`` / ``weight_zero_point``, idempotent where
   GPTQ already wrote them) with no ``quantization_config``, and measures every model with llmc's
   PPL evaluator (WikiText-2 test, first ``--windows`` windows of 2048 tokens);
6. per ``--schemes`` row (none by default), both tools quantize weights and activations and write
   a compressed-tensors folder (llmc: ``save_vllm``; llm-compressor: ``save_pretrained(...,
   save_compressed=True)``), and both folders are measured by one evaluator: loaded by
   transformers + compressed-tensors in llmc's environment (their quantized forward, activations
   included; ``schemes.loader_ppl``) on the same WikiText-2 windows; llmc's rows also give its own
   ``fake_quant`` PPL. The rows (llmc's overrides on the GPTQ quick-start config / the peer's
   recipe, ``lm_head`` left in float by both):

   - ``w8a8-sq-gptq``: ``quant.method=[SmoothQuant, GPTQ]``, ``quant.scheme=W8A8``, SmoothQuant
     alpha 0.8 on llm-compressor's default groups (the norms before q/k/v and gate/up), GPTQ's
     defaults (true-sequential, act-order, ``quant_out``) /
     ``[SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8")]`` (dampening
     0.01, block 128, static act-order, min-max); llmc smooths and solves block by block, the
     peer smooths the whole model on float activations before GPTQ's pass;
   - ``fp8-dynamic``: RTN ``quant.scheme=FP8_DYNAMIC``, no calibration /
     ``QuantizationModifier(scheme="FP8_DYNAMIC")``, oneshot without a dataset;
   - ``nvfp4``: RTN ``quant.scheme=NVFP4`` (static activation global scales calibrated on the
     shared ids) / ``QuantizationModifier(scheme="NVFP4")`` on the same ids. A peer row that fails
     is a row with the last line of its error, not the end of the invocation.

Columns: ``method s`` is llmc's method stages (transform + quantize) / llm-compressor's
``oneshot`` call, neither counting model loading, evaluation or saving; ``peak RSS`` is the
process's peak resident memory during that (model included; on Linux both reset the peak, VmHWM,
when it starts, so loading before it does not count; no run evaluates before its method: the float
model's PPL comes from an evaluation-only llmc run of its own); ``dtype`` is the precision of
AWQ's search and of GPTQ's block forwards (llmc: what ``search_dtype: auto`` /
``forward_dtype: auto`` chose, from its log, or the variant's explicit value; llm-compressor:
the model's);
``÷ peer`` divides llmc's figure by llm-compressor's for the same method and bits (scheme rows:
loader PPL by loader PPL).

    LLMC_DATA=../shared/data python benchmarks/peers.py                  # AWQ+GPTQ, w4+w3, 128 samples
    python benchmarks/peers.py --bits 4 --methods gptq --out /tmp/peers --venv /tmp/peer-venv
    python benchmarks/peers.py --methods --schemes w8a8-sq-gptq fp8-dynamic nvfp4   # scheme rows only

CPU-only torch: llm-compressor 0.14.0.1 runs as released but for one call. AWQ's smoothing pins
each cached block input (``IntermediatesCache.pin_memory``) before its grid search, to copy it to
an accelerator without blocking; pinning needs an accelerator, so on a CPU-only torch it raises
("Cannot access accelerator device when none is available"). The peer script makes that call do
nothing when ``torch.accelerator`` finds no device (``_no_pinned_cache``): the inputs stay in host
memory, where a CPU run reads them anyway. Nothing else of llm-compressor is changed: its
calibration DataLoader pins only with an accelerator and workers, and its AWQ search restores
each candidate from ``weight.clone()`` (0.6.0 kept a ``.cpu()`` snapshot that aliases the live
weights on a CPU and needed a patch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"gptq": ROOT / "configs" / "quickstart" / "gptq_w4g64_smollm2.yml", "awq": ROOT / "configs" / "quickstart" / "awq_w4g64_smollm2.yml"}
LLMCOMPRESSOR_VERSION = "0.14.0.1"
SEED, SEQ_LEN, GROUP = 42, 512, 64
# --schemes row -> llmc's overrides on the GPTQ quick-start config (the peer's recipes are in PEER_SCRIPT)
SCHEMES = {
    "w8a8-sq-gptq": ["quant.method=[SmoothQuant, GPTQ]", "quant.scheme=W8A8", "quant.special={SmoothQuant: {alpha: 0.8, groups: [qkv, gate_up]}, GPTQ: {}}"],
    "fp8-dynamic": ["quant.method=RTN", "quant.scheme=FP8_DYNAMIC", "quant.special={}", "calib=null"],
    "nvfp4": ["quant.method=RTN", "quant.scheme=NVFP4", "quant.special={}"],
}

PEER_SCRIPT = textwrap.dedent(
    '''
    import json, resource, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    model_dir, ids_file, out_dir, row, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    weight_only = row in ("gptq", "awq")

    def _no_pinned_cache():
        """AWQ's smoothing pins every cached input of a block (``IntermediatesCache.pin_memory``)
        so that its grid search can copy them to the accelerator without blocking. Pinning needs
        an accelerator: on a CPU-only torch ``Tensor.pin_memory()`` raises. Without a device there
        is nothing to copy to, so the inputs stay as they are, in host memory."""
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    def recipe():
        if weight_only:
            weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group}
            if row == "gptq":
                weights["actorder"] = "weight"
            groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
            if row == "gptq":
                return [GPTQModifier(dampening_frac=0.01, block_size=128, ignore=["lm_head"], config_groups=groups)]
            # AWQModifier searches and folds the scales; the QuantizationModifier rounds the weights
            return [AWQModifier(duo_scaling=True), QuantizationModifier(ignore=["lm_head"], config_groups=groups)]
        if row == "w8a8-sq-gptq":
            return [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8", targets="Linear", ignore=["lm_head"])]
        return [QuantizationModifier(scheme={"fp8-dynamic": "FP8_DYNAMIC", "nvfp4": "NVFP4"}[row], targets="Linear", ignore=["lm_head"])]

    if not torch.accelerator.is_available():
        _no_pinned_cache()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    calibration = {}
    if row != "fp8-dynamic":  # dynamic activations and per-channel weights need no data
        ids = json.load(open(ids_file))
        data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
        calibration = {"dataset": data, "max_seq_length": len(ids[0]), "num_calibration_samples": len(ids)}
    modifiers = recipe()

    def reset_peak():  # the peak of oneshot alone, as llmc's stages record theirs (Linux)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak_mb(own):
        if own:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    own = reset_peak()
    start = time.perf_counter()
    oneshot(model=model, recipe=modifiers, **calibration)
    seconds = time.perf_counter() - start
    peak = peak_mb(own)
    n = 0
    if weight_only:
        # The dense weights llm-compressor's own fake quantization gives (compressed-tensors' signed
        # int range and zero points), so the folder is its quantized model as plain transformers loads it.
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        with torch.no_grad():
            for name, m in model.named_modules():
                scale = getattr(m, "weight_scale", None)
                scheme = getattr(m, "quantization_scheme", None)
                if not isinstance(m, torch.nn.Linear) or scale is None or scheme is None:
                    continue
                m.weight.copy_(fake_quantize(m.weight, scale, m.weight_zero_point, scheme.weights))
                n += 1
                for extra in ("weight_scale", "weight_zero_point"):
                    if hasattr(m, extra):
                        delattr(m, extra)
        if not n:
            raise SystemExit("llm-compressor left no weight_scale on any Linear: nothing was quantized")
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # The class's save_pretrained, not the one oneshot installs on the model, which would pack the
        # weights into compressed-tensors again: the folder must be dense float weights.
        from transformers import PreTrainedModel
        PreTrainedModel.save_pretrained(model, out_dir, safe_serialization=True)
    else:
        n = sum(1 for m in model.modules() if hasattr(m, "quantization_scheme"))
        model.save_pretrained(out_dir, save_compressed=True)  # oneshot's: a compressed-tensors folder
    tok.save_pretrained(out_dir)
    import llmcompressor
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "layers": n, "version": llmcompressor.__version__}))
    '''
)


def llmc(args: list[str], log_file: Path | None = None) -> str:
    """``llmc run ARGS``; returns its log (stderr), also written to ``log_file``."""
    proc = subprocess.run([sys.executable, "-m", "llmc_core", "run", *args], capture_output=True, text=True, check=False)
    if log_file is not None:
        log_file.write_text(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"llmc run {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stderr


def results(save_path: Path) -> dict:
    return json.loads((save_path / "results.json").read_text())


def ppl_of(save_path: Path, position: str) -> float:
    return next(r["value"] for r in results(save_path)["results"] if r["position"] == position)


def method_stages(save_path: Path) -> tuple[float, float]:
    """Seconds of the method's stages (whole-model step, transform, quantize) and the peak RSS at their end."""
    stages = [s for s in results(save_path)["stages"] if s["stage"].endswith((" transform", " whole-model step")) or s["stage"] == "quantize"]
    return sum(s["seconds"] for s in stages), max(s["peak_rss_mb"] for s in stages)


def convert(out: Path) -> Path:
    """The GGUF model as a HF folder (float32), once."""
    target = out / "hf_model"
    if not (target / "config.json").is_file():
        from llmc_core import config

        cfg = config.load(CONFIGS["gptq"], [f"save.save_path={out / 'convert'}", "save.overwrite=true"])
        model, tok = cfg.model_family().load(cfg.model)
        model.save_pretrained(target, safe_serialization=True)
        tok.save_pretrained(target)
    return target


def draw_calibration(out: Path, hf: Path, n_samples: int, wrap=lambda tok: tok) -> tuple:
    """llmc's calibration draw for the GPTQ config (C4, random_window, seed 42) with the HF
    folder's tokenizer, passed through ``wrap`` (e.g. to record what the recipe encodes): what
    ``llmc run`` on that folder draws. Returns (the calib section, its rows, the samples, the
    tokenizer the recipe used)."""
    from llmc_core import config
    from llmc_core.plugins import get_manager

    cfg = config.load(CONFIGS["gptq"], [f"save.save_path={out / 'convert'}", "save.overwrite=true", f"model.path={hf}", "model.type=llama", f"calib.n_samples={n_samples}"])
    c = cfg.calib
    manager = get_manager()
    _, tok = cfg.model_family().load(cfg.model)
    tok = wrap(tok)
    rows = manager.get("dataset", c.name, "calib.name")().read_rows(c.path, c.download, "calib", "calib.path")
    samples = manager.get("preproc", c.preproc, "calib.preproc")().samples(rows, tok, c.n_samples, c.seq_len, c.seed)
    return c, rows, samples, tok


def calibration_ids(out: Path, hf: Path, n_samples: int) -> Path:
    """The calibration samples (``draw_calibration``) as token id lists in ``OUT/calib_ids.json``."""
    _, _, samples, _ = draw_calibration(out, hf, n_samples)
    path = out / "calib_ids.json"
    path.write_text(json.dumps([s[0].tolist() for s in samples]))
    return path


def peer_venv(path: Path) -> Path:
    """llm-compressor's venv at ``path``: used as it is when its llmcompressor is the pinned
    version, else built (torch's CPU wheel first, then llmcompressor with its own pins)."""
    python = path / "bin" / "python"
    if python.is_file():
        probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"], capture_output=True, text=True, check=False)
        if probe.stdout.strip() == LLMCOMPRESSOR_VERSION:
            return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"llmcompressor=={LLMCOMPRESSOR_VERSION}"], check=True)
    return python


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def eval_only_ppl(model: Path, save_path: Path, common: list[str]) -> float:
    """PPL of the model folder ``model``, in an ``llmc run`` that only evaluates it (``pretrain``)."""
    llmc([str(CONFIGS["gptq"]), *common, f"model.path={model}", f"save.save_path={save_path}", "save.overwrite=true", "eval.eval_pos=[pretrain]", "quant=null", "calib=null", "save.save_fake=false"])
    return ppl_of(save_path, "pretrain")


def float_ppl(out: Path, hf: Path, common: list[str], reuse: bool) -> float:
    """The float model's PPL, in an evaluation-only run of its own: a method's run never follows an
    evaluation in the same process, as the peer's never does (a forward pages in every weight of
    the lazily loaded model, which would count in that run's peak memory)."""
    fp = out / "llmc_fp32"
    if reuse and (fp / "results.json").is_file():
        return ppl_of(fp, "pretrain")
    return eval_only_ppl(hf, fp, common)


def run_llmc(method: str, bit: int, out: Path, common: list[str], n_samples: int, reuse: bool, variant: tuple[str, list[str]] = ("", [])) -> dict:
    """One llmc run of the method, measured on ``fake_quant`` only. ``reuse``: take a
    finished run's results and log from ``out`` instead of running it again. ``variant``: a
    label and the overrides that make it (``--variant``)."""
    label, extra = variant
    tag = f"llmc_{method}_w{bit}" + (f"_{label}" if label else "")
    mine = out / tag
    log_file = out / f"{tag}.log"
    overrides = [*common, f"save.save_path={mine}", "save.overwrite=true", f"quant.weight.bit={bit}", "eval.eval_pos=[fake_quant]", f"calib.n_samples={n_samples}", "calib.preproc=random_window", *extra]
    if reuse and (mine / "results.json").is_file() and log_file.is_file():
        log = log_file.read_text()
    else:
        log = llmc([str(CONFIGS[method]), *overrides], log_file)
    seconds, peak = method_stages(mine)
    chosen = re.search(r"(?:search|forward)_dtype auto: (\w+)", log)
    given = [o.split("=", 1)[1] for o in extra if o.startswith(("quant.special.search_dtype=", "quant.special.forward_dtype="))]
    dtype = given[-1] if given else chosen.group(1) if chosen else "?"
    return {"tool": f"llmc {label}".strip(), "method": method, "bit": bit, "seconds": seconds, "peak_mb": peak, "dtype": dtype, "ppl": ppl_of(mine, "fake_quant")}


def peer(python: Path, row: str, out: Path, hf: Path, ids: Path, tag: str, bit: int = 0) -> tuple[dict | None, str]:
    """llm-compressor's ``oneshot`` for ``row`` (``PEER_SCRIPT``), writing ``OUT/TAG/model``; its
    log (llm-compressor logs on stdout, tracebacks and progress bars on stderr) goes to
    ``OUT/TAG.log``. Returns its record (the last line of stdout, also in ``OUT/TAG.json``) and,
    when it failed, the last line of its error."""
    proc = subprocess.run([str(python), "-c", PEER_SCRIPT, str(hf), str(ids), str(out / tag / "model"), row, str(bit), str(GROUP)], capture_output=True, text=True, check=False, cwd=out)  # its sparse_logs/ go to OUT
    (out / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        return None, f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"
    record = proc.stdout.strip().splitlines()[-1]
    (out / f"{tag}.json").write_text(record + "\n")
    return json.loads(record), ""


def run_peer(python: Path, method: str, bit: int, out: Path, hf: Path, ids: Path, common: list[str]) -> dict:
    tag = f"peer_{method}_w{bit}"
    info, error = peer(python, method, out, hf, ids, tag, bit)
    if info is None:
        raise SystemExit(f"llm-compressor {method} w{bit} failed ({error}); its log: {out / tag}.log")
    ppl = eval_only_ppl(out / tag / "model", out / tag / "eval", common)
    return {"tool": f"llm-compressor {info['version']}", "method": method, "bit": bit, "seconds": info["seconds"], "peak_mb": info["peak_rss_mb"], "dtype": "float32", "ppl": ppl}


def run_llmc_scheme(scheme: str, out: Path, common: list[str], n_samples: int, reuse: bool) -> dict:
    """llmc's run of a ``--schemes`` row: its ``fake_quant`` PPL and its compressed-tensors folder
    (``save_vllm``) for the loader. ``reuse`` as in :func:`run_llmc`."""
    tag = f"llmc_{scheme}"
    mine = out / tag
    overrides = [*common, f"save.save_path={mine}", "save.overwrite=true", "quant.weight=null", "eval.eval_pos=[fake_quant]", "save.save_vllm=true", *SCHEMES[scheme]]
    if "calib=null" not in overrides:  # the ids calib_ids.json holds
        overrides += [f"calib.n_samples={n_samples}", "calib.preproc=random_window"]
    if not (reuse and (mine / "results.json").is_file()):
        llmc([str(CONFIGS["gptq"]), *overrides], out / f"{tag}.log")
    seconds, peak = method_stages(mine)
    return {"tool": "llmc", "scheme": scheme, "seconds": seconds, "peak_mb": peak, "ppl": ppl_of(mine, "fake_quant"), "folder": str(mine / "vllm_quant_model")}


def run_peer_scheme(python: Path, scheme: str, out: Path, hf: Path, ids: Path) -> dict:
    """llm-compressor's run of a ``--schemes`` row; a failure is a row with its reason."""
    tag = f"peer_{scheme}"
    info, error = peer(python, scheme, out, hf, ids, tag)
    if info is None:
        return {"tool": f"llm-compressor {LLMCOMPRESSOR_VERSION}", "scheme": scheme, "error": error}
    return {"tool": f"llm-compressor {info['version']}", "scheme": scheme, "seconds": info["seconds"], "peak_mb": info["peak_rss_mb"], "folder": str(out / tag / "model")}


def progress(rows: list[dict], out: Path) -> None:
    """Each row as it is measured, on stderr and in ``OUT/rows.json`` (an interrupted run keeps them)."""
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


def method_table(rows: list[dict], samples: int) -> None:
    head = f"| {'tool':<23} | {'method':<6} | bits | samples | {'method s':>9} | {'peak RSS MB':>11} | {'dtype':<8} | {'PPL':>7} | {'÷ peer time':>11} | {'÷ peer PPL':>10} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        peer_row = next(x for x in rows if not x["tool"].startswith("llmc") and x["method"] == r["method"] and x["bit"] == r["bit"])
        mine = r["tool"].startswith("llmc")
        ratio_t = f"{r['seconds'] / peer_row['seconds']:.2f}" if mine else ""
        ratio_p = f"{r['ppl'] / peer_row['ppl']:.4f}" if mine else ""
        print(f"| {r['tool']:<23} | {r['method']:<6} | {r['bit']:>4} | {samples:>7} | {r['seconds']:>9.1f} | {r['peak_mb']:>11.0f} | {r['dtype']:<8} | {r['ppl']:>7.3f} | {ratio_t:>11} | {ratio_p:>10} |")


def scheme_table(rows: list[dict]) -> None:
    head = f"| {'tool':<23} | {'scheme / recipe':<15} | {'method s':>9} | {'peak RSS MB':>11} | {'fake_quant PPL':>14} | {'loader PPL':>10} | {'÷ peer PPL':>10} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tool']:<23} | {r['scheme']:<15} | {'':>9} | {'':>11} | {'':>14} | did not run: {r['error']} | {'':>10} |")
            continue
        peer_row = next(x for x in rows if not x["tool"].startswith("llmc") and x["scheme"] == r["scheme"])
        mine = r["tool"].startswith("llmc")
        fake = f"{r['ppl']:.3f}" if mine else ""
        ratio = f"{r['loader_ppl'] / peer_row['loader_ppl']:.4f}" if mine and "loader_ppl" in peer_row else ""
        print(f"| {r['tool']:<23} | {r['scheme']:<15} | {r['seconds']:>9.1f} | {r['peak_mb']:>11.0f} | {fake:>14} | {r['loader_ppl']:>10.3f} | {ratio:>10} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=21)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--methods", nargs="*", choices=sorted(CONFIGS), default=["gptq", "awq"], help="weight-only rows (none with the flag alone: only --schemes rows)")
    ap.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=[], help="weight + activation rows, measured on compressed-tensors folders by transformers' loader")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--venv", type=Path, default=None, help="llm-compressor's venv (built with the pinned version if it has another)")
    ap.add_argument("--reuse", action="store_true", help="keep llmc runs already finished in --out (their results.json and log)")
    ap.add_argument("--variant", action="append", default=[], metavar="METHOD:LABEL:KEY=VALUE[,KEY=VALUE]", help="one more llmc row for METHOD with these overrides, e.g. gptq:one-pass:quant.special.true_sequential=false")
    ap.add_argument("--only-variants", action="store_true", help="for a method with --variant rows, run those and not its default llmc row")
    args = ap.parse_args()
    os.environ.setdefault("LLMC_DATA", str(ROOT.parent / "shared" / "data"))
    out = args.out or Path(tempfile.mkdtemp(prefix="peers_"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    hf = convert(out)
    ids = calibration_ids(out, hf, args.samples)
    python = peer_venv(args.venv or out / "peer-venv")
    common = [f"model.path={hf}", "model.type=llama", f"eval.num_samples={args.windows}"]
    variants: dict[str, list[tuple[str, list[str]]]] = {}
    for v in args.variant:
        method, label, sets = v.split(":", 2)
        variants.setdefault(method, []).append((label, sets.split(",")))
    fp = float_ppl(out, hf, common, args.reuse)
    rows = []
    for method in args.methods:
        for bit in args.bits:
            own = variants.get(method, [])
            for variant in own if args.only_variants and own else [("", []), *own]:
                rows.append(run_llmc(method, bit, out, common, args.samples, reuse=args.reuse, variant=variant))
                progress(rows, out)
            rows.append(run_peer(python, method, bit, out, hf, ids, common))
            progress(rows, out)
            print(f"done {method} w{bit} after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if args.schemes:
        from schemes import eval_ids, loader_ppl  # here: schemes.py imports from this module

        windows = eval_ids(hf)
        fp_loader = loader_ppl(hf, windows, args.windows)

        def measured(row: dict) -> None:  # each tool's folder on the same windows, kept as it comes
            if "folder" in row:
                row["loader_ppl"] = loader_ppl(Path(row["folder"]), windows, args.windows)
            rows.append(row)
            progress(rows, out)

        for scheme in args.schemes:
            measured(run_llmc_scheme(scheme, out, common, args.samples, args.reuse))
            measured(run_peer_scheme(python, scheme, out, hf, ids))
            print(f"done {scheme} after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    source = f"SmolLM2-135M fp32 (HF folder from the GGUF) on {cpu_name()}; {args.samples}x{SEQ_LEN} C4 ids shared; WikiText-2 test, first {args.windows} windows"
    method_rows = [r for r in rows if "method" in r]
    if method_rows:
        print(f"{source}; W{{{','.join(map(str, args.bits))}}}A16 asym g{GROUP}; fp32 PPL {fp:.3f}")
        method_table(method_rows, args.samples)
    if args.schemes:
        print(f"{source}; compressed-tensors folders loaded by transformers + compressed-tensors; fp32 PPL {fp:.3f} (llmc), {fp_loader:.3f} (loader)")
        scheme_table([r for r in rows if "scheme" in r])
    print(f"total {time.perf_counter() - start:.0f} s; outputs in {out}")


if __name__ == "__main__":
    main()
