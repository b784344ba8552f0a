"""llmc next to llm-compressor on SmolLM2-135M, in one run: AWQ and GPTQ, wall time, peak memory, PPL.

What one invocation does:

1. converts the GGUF model once to a Hugging Face folder (``OUT/hf_model``, float32), which both
   tools read;
2. draws the calibration ids once with llmc's C4 ``random_window`` recipe (``--samples`` x 512
   tokens, seed 42) and writes them to ``OUT/calib_ids.json``; llmc's runs (AWQ's too, with
   ``calib.preproc=random_window``) draw the same ids with the same recipe, seed and tokenizer
   (the recipe is deterministic), llm-compressor reads them from the file;
3. builds ``OUT/peer-venv`` (or uses ``--venv``) with torch 2.13.0 (the CPU wheel on this disk),
   ``llmcompressor==LLMCOMPRESSOR_VERSION`` and the pins it needs to run (``PEER_PINS``);
4. per method and bit width: ``llmc run`` (AWQ: the quick-start recipe, scales + clipping;
   GPTQ: the quick-start recipe, act-order with static groups, ``quant_out``, ``calib_algo: mse``
   weighted by ``diag H``; ``--variant gptq:minmax:quant.weight.calib_algo=minmax`` adds the
   reference's range rule) and llm-compressor's ``oneshot`` with
   ``AWQModifier`` (its defaults: duo scaling, no clipping) or ``GPTQModifier`` (dampening 0.01,
   block 128, ``actorder: weight`` = llmc's act-order with static groups), both W{bits}A16
   asymmetric, group 64, ``lm_head`` left in float;
5. writes llm-compressor's result as dense fake-quantized weights (compressed-tensors' own
   ``fake_quantize`` with each layer's ``weight_scale`` / ``weight_zero_point`` / ``g_idx``,
   idempotent where GPTQ already wrote them) with no ``quantization_config``, and measures every model with llmc's PPL evaluator (WikiText-2 test,
   first ``--windows`` windows of 2048 tokens).

Columns: ``method s`` is llmc's method stages (transform + quantize) / llm-compressor's
``oneshot`` call, neither counting model loading or evaluation; ``peak RSS`` is the process's
peak resident memory during that (model included; on Linux both reset the peak, VmHWM, when it
starts, so loading before it does not count; no run evaluates before its method: the float
model's PPL comes from an evaluation-only llmc run of its own); ``dtype`` is the precision of
AWQ's search and of GPTQ's block forwards (llmc: what ``search_dtype: auto`` /
``forward_dtype: auto`` chose, from its log, or the variant's explicit value; llm-compressor:
the model's);
``÷ peer`` divides llmc's figure by llm-compressor's for the same method and bits.

    LLMC_DATA=../shared/data python benchmarks/peers.py                  # AWQ+GPTQ, w4+w3, 128 samples
    python benchmarks/peers.py --bits 4 --methods gptq --out /tmp/peers --venv /tmp/peer-venv

CPU-only torch: llm-compressor 0.6.0's calibration DataLoader asks for ``pin_memory=True``; the
peer script turns it off before ``oneshot`` (``_no_pin_memory``), since pinning needs an
accelerator. Its AWQ search also restores each candidate from a "snapshot" that, on a CPU,
aliases the live weights (``tensor.cpu()`` returns the tensor itself), so without a fix every
grid point compounds the previous one's quantization and its W4 PPL came out 36.2, worse than
RTN's 27.3; the script makes that snapshot a copy during the search (``_awq_snapshot_by_copy``,
what ``.cpu()`` already does on a GPU) and reports how many searches it covered. Nothing else of
llm-compressor is changed.
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
LLMCOMPRESSOR_VERSION = "0.6.0"
# llmcompressor 0.6.0 imports with numpy 1.x (pyarrow and datasets before those that need numpy 2)
# and traces models with torch.fx, which transformers' vmap masks of 4.53+ break.
PEER_PINS = ("transformers==4.52.4", "datasets<4", "pyarrow<20")
SEED, SEQ_LEN, GROUP = 42, 512, 64

PEER_SCRIPT = textwrap.dedent(
    '''
    import json, resource, sys, time
    import torch
    import torch.utils.data
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmcompressor import oneshot

    model_dir, ids_file, out_dir, method, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])

    def _no_pin_memory():
        """Pinning host memory needs an accelerator; on a CPU-only torch the loader must not ask."""
        init = torch.utils.data.DataLoader.__init__
        def patched(self, *a, **kw):
            kw["pin_memory"] = False
            init(self, *a, **kw)
        torch.utils.data.DataLoader.__init__ = patched

    snapshots = []

    def _awq_snapshot_by_copy():
        """llm-compressor 0.6.0's AWQ grid search keeps ``{k: v.cpu() for k, v in state_dict()}`` to
        restore the block after each candidate; on a CPU tensor ``.cpu()`` is the tensor itself, so
        the in-place ``mul_`` / ``copy_`` of each candidate also rewrites the "original" and the
        restore does nothing: every candidate starts from the previous one's quantized weights
        (the bug llm-awq's issue 163 reports for its own search). During that search the block's
        ``state_dict`` hands out copies, which is what ``.cpu()`` gives on an accelerator."""
        from llmcompressor.modifiers.awq.base import AWQModifier
        search = AWQModifier._compute_best_scale
        def patched(self, x_mean, w_mean, parent_module, *a, **kw):
            own = parent_module.state_dict
            parent_module.state_dict = lambda *x, **y: {k: v.clone() for k, v in own(*x, **y).items()}
            try:
                return search(self, x_mean, w_mean, parent_module, *a, **kw)
            finally:
                del parent_module.state_dict
                snapshots.append(1)
        AWQModifier._compute_best_scale = patched

    if not torch.cuda.is_available():
        _no_pin_memory()
        if method == "awq":
            _awq_snapshot_by_copy()
    ids = json.load(open(ids_file))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group}
    if method == "gptq":
        weights["actorder"] = "weight"
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if method == "gptq":
        modifier = GPTQModifier(dampening_frac=0.01, block_size=128, ignore=["lm_head"], config_groups=groups)
    else:
        modifier = AWQModifier(duo_scaling=True, ignore=["lm_head"], config_groups=groups)
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
    oneshot(model=model, dataset=data, recipe=[modifier], max_seq_length=len(ids[0]), num_calibration_samples=len(ids))
    seconds = time.perf_counter() - start
    peak = peak_mb(own)
    if method == "awq" and not torch.cuda.is_available() and not snapshots:
        raise SystemExit("the AWQ snapshot patch never ran: llm-compressor's search is not the one it fixes")
    # The dense weights llm-compressor's own fake quantization gives (compressed-tensors' signed
    # int range and zero points), so the folder is its quantized model as plain transformers loads it.
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    n = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            scale = getattr(m, "weight_scale", None)
            scheme = getattr(m, "quantization_scheme", None)
            if not isinstance(m, torch.nn.Linear) or scale is None or scheme is None:
                continue
            m.weight.copy_(fake_quantize(m.weight, scale, m.weight_zero_point, scheme.weights, g_idx=getattr(m, "weight_g_idx", None)))
            n += 1
            for extra in ("weight_scale", "weight_zero_point", "weight_g_idx"):
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
    tok.save_pretrained(out_dir)
    import llmcompressor
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "layers": n, "version": llmcompressor.__version__, "awq_searches_patched": len(snapshots)}))
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
    """Seconds of the method's stages (transform, quantize) and the peak RSS at their end."""
    stages = [s for s in results(save_path)["stages"] if s["stage"].endswith(" transform") or s["stage"] == "quantize"]
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
    _portable_tokenizer(target)
    return target


def _portable_tokenizer(folder: Path) -> None:
    """transformers 5 names its fast tokenizers ``TokenizersBackend``, a class the peer's pinned
    transformers 4 does not know; both read ``PreTrainedTokenizerFast`` from the same
    ``tokenizer.json``, so the token ids are the same."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2))


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
    python = path / "bin" / "python"
    if not (path / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"llmcompressor=={LLMCOMPRESSOR_VERSION}", *PEER_PINS], check=True)
        (path / ".complete").touch()
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


def run_peer(python: Path, method: str, bit: int, out: Path, hf: Path, ids: Path, common: list[str]) -> dict:
    peer = out / f"peer_{method}_w{bit}"
    proc = subprocess.run([str(python), "-c", PEER_SCRIPT, str(hf), str(ids), str(peer / "model"), method, str(bit), str(GROUP)], capture_output=True, text=True, check=False, cwd=out)  # its sparse_logs/ go to OUT
    (out / f"peer_{method}_w{bit}.log").write_text(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"llm-compressor {method} w{bit} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (out / f"peer_{method}_w{bit}.json").write_text(proc.stdout)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    ppl = eval_only_ppl(peer / "model", peer / "eval", common)
    return {"tool": f"llm-compressor {info['version']}", "method": method, "bit": bit, "seconds": info["seconds"], "peak_mb": info["peak_rss_mb"], "dtype": "float32", "ppl": ppl}


def progress(rows: list[dict], out: Path) -> None:
    """Each row as it is measured, on stderr and in ``OUT/rows.json`` (an interrupted run keeps them)."""
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=21)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--methods", nargs="+", choices=sorted(CONFIGS), default=["gptq", "awq"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--venv", type=Path, default=None, help="llm-compressor's venv (built with the pinned version if missing)")
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
    print(f"SmolLM2-135M fp32 (HF folder from the GGUF) on {cpu_name()}; W{{{','.join(map(str, args.bits))}}}A16 asym g{GROUP}; {args.samples}x{SEQ_LEN} C4 ids shared; WikiText-2 test, first {args.windows} windows; fp32 PPL {fp:.3f}")
    head = f"| {'tool':<20} | {'method':<6} | bits | samples | {'method s':>9} | {'peak RSS MB':>11} | {'dtype':<8} | {'PPL':>7} | {'÷ peer time':>11} | {'÷ peer PPL':>10} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        peer = next(x for x in rows if not x["tool"].startswith("llmc") and x["method"] == r["method"] and x["bit"] == r["bit"])
        mine = r["tool"].startswith("llmc")
        ratio_t = f"{r['seconds'] / peer['seconds']:.2f}" if mine else ""
        ratio_p = f"{r['ppl'] / peer['ppl']:.4f}" if mine else ""
        print(f"| {r['tool']:<20} | {r['method']:<6} | {r['bit']:>4} | {args.samples:>7} | {r['seconds']:>9.1f} | {r['peak_mb']:>11.0f} | {r['dtype']:<8} | {r['ppl']:>7.3f} | {ratio_t:>11} | {ratio_p:>10} |")
    print(f"total {time.perf_counter() - start:.0f} s; outputs in {out}")


if __name__ == "__main__":
    main()
