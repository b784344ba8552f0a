"""llama.cpp judges GGUF files of SmolLM2-135M-Instruct: its own quantizations (with and without an
importance matrix) next to the files llmc writes (``save.save_gguf``), every one measured by
``llama-perplexity`` on the same text with the same context, in one table.

What one invocation does (llama.cpp's tools and venv from ``llamacpp_build.build(--llamacpp)``,
built there first if missing):

1. the float model (``--hf``, or the GGUF converted to a HF folder as ``peers.convert`` does) as
   ``OUT/f32.gguf`` by llama.cpp's ``convert_hf_to_gguf.py --outtype f32``;
2. calibration text for ``llama-imatrix``: llmc's C4 ``random_window`` ids (``--samples`` x 512
   tokens, seed 42; ``peers.calibration_ids``, ``OUT/calib_ids.json``), each window decoded by the
   HF tokenizer and the windows joined into ``OUT/calib.txt``. llama-imatrix reads text only, so
   it tokenizes the join again and cuts it into 512-token chunks (``-c 512``): nearly the same
   windows, not bit for bit (a merge can cross a window's edge), and its log says how many
   tokens it found. It writes ``OUT/imatrix-SAMPLES.gguf``;
3. per ``--types`` type, ``llama-quantize`` from ``f32.gguf``, without and with ``--imatrix``;
4. per llmc method (RTN, AWQ, GPTQ: the quick-start configs) and type, ``llmc run`` into
   ``OUT/llmc_METHOD_TYPE[_nSAMPLES]`` with ``save.save_gguf=true`` and no evaluation, on the HF
   folder, the type's weight spec set key by key (so GPTQ keeps its ``calib_algo``, AWQ its
   clipping), the same calibration draw (``--samples`` x 512 ``random_window``) and
   ``model.tokenizer_path=OUT/f32.gguf``: the file carries llama.cpp's own tokenizer, so
   llama-perplexity reads the same tokens from every file (transformers reads the same ids from
   that tokenizer as from the HF folder's). A run that fails (e.g. a type llmc does not write
   yet) is a row with the last line of its error;
5. every file (F32, llama.cpp's, llmc's) through ``llama-perplexity -f wiki.test.raw -c --ctx``
   (``--chunks``: the first N chunks; llama-perplexity scores the second half of each chunk):
   its final PPL estimate; the file's bits per weight are its tensors' bytes x 8 / parameters
   (``gguf.GGUFReader``; the tokenizer and other metadata not counted);
6. one markdown table (the CPU in its heading), kept with every row in ``OUT/rows.json``.

``make s`` is the wall time of the command that made the file: ``convert_hf_to_gguf.py`` (F32),
``llama-quantize`` (the imatrix's own time is in the heading), ``llmc run`` (process start,
loading, calibration, method, saving; no evaluation).

    python benchmarks/gguf_judge.py --out /work/runs/gguf --hf /work/runs/schemes4/hf_model --chunks 4
    python benchmarks/gguf_judge.py --out /work/runs/gguf --reuse     # rows already made and measured are kept
    python benchmarks/gguf_judge.py --out /tmp/gguf --chunks 4 --samples 32 --methods RTN   # a quick look
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llamacpp_build import build  # noqa: E402
from peers import calibration_ids, convert, cpu_name, llmc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMC_DATA", ROOT.parent / "shared" / "data"))
CONFIGS = {name: ROOT / "configs" / "quickstart" / f"{name.lower()}_w4g64_smollm2.yml" for name in ("RTN", "AWQ", "GPTQ")}
# type -> llmc's overrides for it: legacy types as a weight spec (key by key), K-quants as a scheme
WEIGHT_SPECS = {
    "Q4_0": {"bit": 4, "symmetric": "true", "granularity": "per_group", "group_size": 32},
    "Q4_1": {"bit": 4, "symmetric": "false", "granularity": "per_group", "group_size": 32},
    "Q5_0": {"bit": 5, "symmetric": "true", "granularity": "per_group", "group_size": 32},
    "Q5_1": {"bit": 5, "symmetric": "false", "granularity": "per_group", "group_size": 32},
    "Q8_0": {"bit": 8, "symmetric": "true", "granularity": "per_group", "group_size": 32},
}
CALIB_LEN = 512


def llmc_type_overrides(qtype: str) -> list[str]:
    spec = WEIGHT_SPECS.get(qtype)
    if spec is None:
        return ["quant.weight=null", f"quant.scheme={qtype}"]
    return [f"quant.weight.{key}={value}" for key, value in spec.items()]


def timed(cmd: list, log: Path) -> float:
    """Runs ``cmd`` with its output in ``log``; returns its wall seconds. A failure raises
    ``RuntimeError`` with the last line of the output."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise RuntimeError(f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}")
    return seconds


class Made:
    """Files made in ``OUT`` and the seconds each took (``OUT/made.json``); with ``reuse``, a file
    already there is not made again."""

    def __init__(self, out: Path, reuse: bool):
        self.out = out
        self.record = out / "made.json"
        self.seconds = json.loads(self.record.read_text()) if reuse and self.record.is_file() else {}

    def make(self, path: Path, fn) -> float:
        """``fn()`` makes ``path`` and returns its seconds, unless a reused ``path`` exists."""
        key = str(path.relative_to(self.out))
        if key not in self.seconds or not path.exists():
            self.seconds[key] = fn()
            self.record.write_text(json.dumps(self.seconds, indent=1))
        return self.seconds[key]


def calibration_text(out: Path, hf: Path, n_samples: int) -> Path:
    """llmc's calibration windows (``peers.calibration_ids``) decoded and joined: ``OUT/calib.txt``."""
    from transformers import AutoTokenizer

    ids = json.loads(calibration_ids(out, hf, n_samples).read_text())
    tok = AutoTokenizer.from_pretrained(hf)
    path = out / "calib.txt"
    path.write_text("".join(tok.decode(window) for window in ids))
    return path


def perplexity(tools: dict, model: Path, text: Path, ctx: int, chunks: int | None, threads: int, log: Path, reuse: bool) -> dict:
    """``llama-perplexity`` on ``model``: its final PPL estimate and the estimate's +/-."""
    if not (reuse and log.is_file() and "Final estimate" in log.read_text(errors="replace")):
        cmd = [tools["llama-perplexity"], "-m", model, "-f", text, "-c", ctx, "-t", threads]
        timed(cmd + (["--chunks", chunks] if chunks else []), log)
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log.read_text(errors="replace"))
    return {"ppl": float(final.group(1)), "ppl_err": float(final.group(2))}


def weight_bits(model: Path) -> dict:
    """The file's tensors: parameters, bits per weight (tensor bytes x 8 / parameters, metadata and
    tokenizer not counted) and the count of tensors of each GGUF type."""
    from gguf import GGUFReader

    tensors = GGUFReader(model).tensors
    params = sum(int(t.n_elements) for t in tensors)
    types: dict[str, int] = {}
    for t in tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"params": params, "bpw": sum(int(t.n_bytes) for t in tensors) * 8 / params, "tensor_types": types}


def fallbacks(log: Path) -> list[str]:
    """llama-quantize's fallbacks: tensors whose rows it could not cut into the asked type's blocks
    (e.g. 576 columns for a 256-wide K-quant), as "q4_K -> q5_0: 30 x attn_q, ..." per pair."""
    found = re.findall(r"(\S+)\s+- ncols\s+\d+ not divisible by \d+ \(required for type\s+(\w+)\) -> falling back to\s+(\w+)", log.read_text(errors="replace"))
    pairs: dict[tuple[str, str], dict[str, int]] = {}
    for tensor, wanted, used in found:
        kind = re.sub(r"^blk\.\d+\.", "", tensor).removesuffix(".weight")
        counts = pairs.setdefault((wanted, used), {})
        counts[kind] = counts.get(kind, 0) + 1
    return [f"{w} -> {u}: " + ", ".join(f"{n} x {k}" for k, n in counts.items()) for (w, u), counts in pairs.items()]


def llmc_file(method: str, qtype: str, save: Path, hf: Path, f32: Path, n_samples: int) -> float:
    """``llmc run`` of ``method`` writing ``qtype`` as ``SAVE/gguf_model/model.gguf`` (its log:
    ``SAVE.log``); returns its wall seconds."""
    overrides = [
        f"model.path={hf}",
        "model.type=llama",
        f"model.tokenizer_path={f32}",
        f"save.save_path={save}",
        "save.overwrite=true",
        "save.save_fake=false",
        "save.save_gguf=true",
        "eval=null",
        *llmc_type_overrides(qtype),
    ]
    if method != "RTN":  # the draw calib_ids.json holds (AWQ's quick start uses pileval_awq otherwise)
        overrides += [f"calib.n_samples={n_samples}", "calib.preproc=random_window"]
    start = time.perf_counter()
    try:
        llmc([str(CONFIGS[method]), *overrides], save.with_name(save.name + ".log"))
    except SystemExit as failed:
        lines = [line.strip() for line in str(failed).splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else "failed") from None
    if not (save / "gguf_model" / "model.gguf").is_file():
        raise RuntimeError(f"llmc run wrote no {save / 'gguf_model' / 'model.gguf'}")
    return time.perf_counter() - start


def progress(rows: list[dict], out: Path) -> None:
    """Each row as it is measured, on stderr and in ``OUT/rows.json`` (an interrupted run keeps them)."""
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


def table(rows: list[dict]) -> None:
    head = f"| {'type':<6} | {'tool':<17} | {'BPW':>5} | {'size MB':>7} | {'PPL':>16} | {'make s':>6} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        if "error" in r:
            why = r["error"] if len(r["error"]) <= 100 else r["error"][:99] + "…"  # whole in rows.json
            print(f"| {r['type']:<6} | {r['tool']:<17} | {'':>5} | {'':>7} | not run: {why} | {'':>6} |")
            continue
        ppl = f"{r['ppl']:.3f} ± {r['ppl_err']:.3f}"
        bpw = f"{r['bpw']:.2f}" if r.get("bpw") else "?"
        print(f"| {r['type']:<6} | {r['tool']:<17} | {bpw:>5} | {r['size_mb']:>7.1f} | {ppl:>16} | {r['seconds']:>6.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hf", type=Path, default=None, help="the float model's HF folder (default: peers.convert into --out)")
    ap.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp"), help="llamacpp_build's dest (built there if missing)")
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_1", "Q4_K_M", "Q8_0"])
    ap.add_argument("--methods", nargs="*", choices=list(CONFIGS), default=list(CONFIGS), help="llmc's rows (none with the flag alone)")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens (imatrix, AWQ, GPTQ)")
    ap.add_argument("--ctx", type=int, default=2048, help="llama-perplexity's context")
    ap.add_argument("--chunks", type=int, default=None, help="llama-perplexity's first N chunks (default: all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of llama.cpp's tools")
    ap.add_argument("--embeddings", default="f16", help="llama-quantize's --token-embedding-type and --output-tensor-type (llmc's files keep the tensors it does not quantize in f16, so the same type compares the same size); 'auto': llama.cpp's own choice")
    ap.add_argument("--reuse", action="store_true", help="keep files already made in --out and PPLs already measured with the same --ctx/--chunks")
    args = ap.parse_args()
    os.environ.setdefault("LLMC_DATA", str(DATA))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tools = build(args.llamacpp)
    made = Made(out, args.reuse)
    hf = (args.hf or convert(out)).resolve()
    wiki = DATA / "wikitext2" / "wiki.test.raw"
    ppl_tag = f"c{args.ctx}-n{args.chunks or 'all'}"

    f32 = out / "f32.gguf"
    f32_s = made.make(f32, lambda: timed([tools["python"], tools["convert"], hf, "--outtype", "f32", "--outfile", f32], out / "convert.log"))
    calib = calibration_text(out, hf, args.samples)
    imatrix = out / f"imatrix-{args.samples}.gguf"
    imatrix_s = made.make(imatrix, lambda: timed([tools["llama-imatrix"], "-m", f32, "-f", calib, "-c", CALIB_LEN, "-o", imatrix, "-t", args.threads], out / "imatrix.log"))

    rows: list[dict] = []

    def measured(qtype: str, tool: str, make) -> None:
        """One row: the file ``make()`` returns (path, seconds), measured; or why there is none."""
        try:
            path, seconds = make()
            row = {"type": qtype, "tool": tool, "file": str(path), "size_mb": path.stat().st_size / 1e6, "seconds": seconds}
            row.update(weight_bits(path))
            row.update(perplexity(tools, path, wiki, args.ctx, args.chunks, args.threads, path.with_suffix(f".ppl-{ppl_tag}.log"), args.reuse))
        except RuntimeError as failed:
            row = {"type": qtype, "tool": tool, "error": str(failed)}
        rows.append(row)
        progress(rows, out)

    measured("F32", "llama.cpp convert", lambda: (f32, f32_s))
    notes: dict[str, list[str]] = {}
    for qtype in args.types:
        keep = [] if args.embeddings == "auto" else ["--token-embedding-type", args.embeddings, "--output-tensor-type", args.embeddings]
        for tool, extra in (("llama.cpp", keep), ("llama.cpp+imatrix", [*keep, "--imatrix", imatrix])):
            target = out / f"llamacpp_{qtype}{'_imatrix' if '--imatrix' in extra else ''}{'' if args.embeddings == 'auto' else '_emb-' + args.embeddings}.gguf"
            log = target.with_suffix(".log")

            def quantize(target=target, extra=extra, log=log):
                seconds = made.make(target, lambda: timed([tools["llama-quantize"], *extra, f32, target, qtype, args.threads], log))
                return target, seconds

            measured(qtype, tool, quantize)
            if log.is_file() and fallbacks(log):
                notes[f"{qtype} {tool}"] = fallbacks(log)
    for method in args.methods:
        for qtype in args.types:
            def llmc_make(method=method, qtype=qtype):
                save = out / (f"llmc_{method}_{qtype}" + ("" if method == "RTN" else f"_n{args.samples}"))
                target = save / "gguf_model" / "model.gguf"
                return target, made.make(target, lambda: llmc_file(method, qtype, save, hf, f32, args.samples))

            measured(qtype, f"llmc {method}", llmc_make)

    chunks = f"first {args.chunks} chunks" if args.chunks else "all chunks"
    print(f"SmolLM2-135M-Instruct (F32 GGUF from {hf}) on {cpu_name()}; llama.cpp {tools['commit']} (vendored by {Path(tools['sdist']).name.removesuffix('.tar.gz')});")
    print(f"llama-perplexity on WikiText-2 test, -c {args.ctx}, {chunks}; imatrix: {args.samples}x{CALIB_LEN} C4 windows (llmc's random_window draw), made in {imatrix_s:.0f} s, not counted in make s")
    table(rows)
    for where, lines in notes.items():
        print(f"llama-quantize {where}: " + "; ".join(lines))
    for r in rows:
        if "tensor_types" in r:
            print(f"tensors of {r['type']} {r['tool']}: " + ", ".join(f"{n} {t}" for t, n in sorted(r["tensor_types"].items())))
    print(f"total {time.perf_counter() - start:.0f} s; outputs in {out}")


if __name__ == "__main__":
    main()
