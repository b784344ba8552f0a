"""GPTQ (and RTN) on SmolLM2-135M measured on text the calibration never saw: WikiText-2 test and
validation, and the C4 documents the calibration draw did not touch.

Every row is one ``llmc run`` of ``configs/quickstart/gptq_w4g64_smollm2.yml`` on the HF folder that
``peers.py`` converts (C4 ``random_window``, ``--samples`` x 512 tokens, seed 42), with three
``eval`` sections at ``fake_quant`` (the first row, RTN, also at ``pretrain``):

- ``wt2-test``: WikiText-2 test, the first ``--windows`` windows of 2048 tokens (the usual table);
- ``wt2-valid``: WikiText-2 validation, the first ``--other-windows`` windows;
- ``c4-heldout``: the first ``--other-windows`` windows of the C4 sample's documents that no
  calibration window came from. The recipe is
  replayed with a tokenizer that records what it encodes; the documents it sampled (more than
  ``seq_len`` tokens, ``random_window``'s rule) are left out and the others written to
  ``OUT/c4_heldout.jsonl``. The script stops when the recipe fell back to the joined text of all
  documents (nothing is held out then) or when it finds another number of sampled documents than
  samples.

``gap`` is the share of the RTN-to-fp32 perplexity gap a row closes on that corpus (RTN at the same
bit width, from the same invocation, with min-max ranges: the usual RTN baseline, whatever range
rule the GPTQ config uses).

    LLMC_DATA=../shared/data python benchmarks/heldout.py --bits 4 3 --out /tmp/heldout
    python benchmarks/heldout.py --bits 4 --variant noact:quant.special.actorder=false,quant.special.static_groups=false
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (the HF folder, llmc runs and results.json readers)

CORPORA = ("wt2-test", "wt2-valid", "c4-heldout")


class _Recording:
    """A tokenizer that remembers every text it encoded and how many ids it gave."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, text, **kw):
        enc = self.tokenizer(text, **kw)
        self.seen.append((text, len(enc["input_ids"])))
        return enc


def c4_heldout(out: Path, hf: Path, n_samples: int) -> tuple[Path, int, int]:
    """Write the C4 documents no calibration window came from; returns (file, kept, total)."""
    c, rows, _, recording = peers.draw_calibration(out, hf, n_samples, wrap=_Recording)
    known = set(rows)
    if any(text not in known for text, _ in recording.seen):
        raise SystemExit("the calibration draw fell back to the joined text of every document: nothing is held out")
    used = {text for text, n in recording.seen if n > c.seq_len}  # random_window's rule for a document it samples
    if len(used) != c.n_samples:
        raise SystemExit(f"expected {c.n_samples} sampled documents, found {len(used)}: the recipe is not the one this script replays")
    kept = [r for r in rows if r not in used and r.strip()]
    path = out / "c4_heldout.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in kept))
    return path, len(kept), len(rows)


def evals(data: str, heldout: Path, windows: int, other_windows: int, positions: str) -> str:
    def one(name: str, path: str, n: int) -> str:
        return f"{{type: ppl, name: {name}, path: '{path}', seq_len: 2048, bs: 1, num_samples: {n}, eval_pos: {positions}}}"

    return "eval=[" + ", ".join([one("wikitext2", f"{data}/wikitext2/wiki.test.raw", windows), one("wikitext2", f"{data}/wikitext2/wiki.valid.raw", other_windows), one("c4", str(heldout), other_windows)]) + "]"


def ppls(save_path: Path, position: str) -> list[float]:
    """The three corpora's PPL at ``position``, in the order of the eval sections."""
    found = [r["value"] for r in peers.results(save_path)["results"] if r["position"] == position and r["metric"] == "perplexity"]
    if len(found) != len(CORPORA):
        raise SystemExit(f"{save_path}: {len(found)} perplexities at {position}, expected {len(CORPORA)}")
    return found


def _overrides(text: str) -> list[str]:
    """``KEY=VALUE[,KEY=VALUE]`` split at the commas outside YAML brackets (``quant.method=[Awq, GPTQ]``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur] if cur else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=21, help="WikiText-2 test windows (the usual table's 21)")
    ap.add_argument("--other-windows", type=int, default=8, help="windows of the two held-out corpora (each 21-window evaluation costs ~3 min on 2 cores)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]", help="one more GPTQ row with these overrides, after the default row")
    ap.add_argument("--variants-first", action="store_true", help="run the --variant rows before the default GPTQ row")
    ap.add_argument("--only-variants", action="store_true", help="run the --variant rows (and RTN, the gap's baseline) but not the default GPTQ row")
    args = ap.parse_args()
    data = os.environ.setdefault("LLMC_DATA", str(peers.ROOT.parent / "shared" / "data"))
    out = args.out or Path(tempfile.mkdtemp(prefix="heldout_"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    hf = peers.convert(out)
    heldout, kept, total = c4_heldout(out, hf, args.samples)
    common = [f"model.path={hf}", "model.type=llama", f"calib.n_samples={args.samples}", "save.overwrite=true"]
    rows, fp = [], None
    for bit in args.bits:
        extra_rows = [(label, _overrides(sets)) for label, sets in (v.split(":", 1) for v in args.variant)]
        gptq = [] if args.only_variants and extra_rows else [("gptq", [])]
        runs = [("rtn", ["quant.method=RTN", "calib=null", "quant.special={}", "quant.weight.calib_algo=minmax"]), *(extra_rows + gptq if args.variants_first else gptq + extra_rows)]
        for label, extra in runs:
            first = fp is None
            mine = out / f"{label}_w{bit}"
            peers.llmc([str(peers.CONFIGS["gptq"]), *common, f"save.save_path={mine}", f"quant.weight.bit={bit}", evals(data, heldout, args.windows, args.other_windows, "[pretrain, fake_quant]" if first else "[fake_quant]"), *extra], out / f"{label}_w{bit}.log")
            if first:
                fp = ppls(mine, "pretrain")
            rows.append({"label": label, "bit": bit, "ppl": ppls(mine, "fake_quant"), "seconds": peers.method_stages(mine)[0]})
            (out / "rows.json").write_text(json.dumps({"fp": fp, "rows": rows}, indent=1))
            print(f"done {label} w{bit} after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(f"SmolLM2-135M fp32 on {peers.cpu_name()}; GPTQ W{{{','.join(map(str, args.bits))}}}A16 asym g{peers.GROUP}; {args.samples}x{peers.SEQ_LEN} C4 random_window; windows of 2048: wt2-test {args.windows}, the others {args.other_windows}; c4-heldout: {kept} of {total} C4 documents, never read by the calibration draw")
    head = f"| {'row':<12} | bits | {'method s':>8} | " + " | ".join(f"{c:>10} |    gap" for c in CORPORA) + " |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    print(f"| {'fp32':<12} |   16 | {'':>8} | " + " | ".join(f"{v:>10.3f} | {'':>6}" for v in fp) + " |")
    for r in rows:
        rtn = next(x for x in rows if x["label"] == "rtn" and x["bit"] == r["bit"])
        gaps = [(q - p) / (q - f) if q != f else float("nan") for p, q, f in zip(r["ppl"], rtn["ppl"], fp)]
        print(f"| {r['label']:<12} | {r['bit']:>4} | {r['seconds']:>8.1f} | " + " | ".join(f"{p:>10.3f} | {g:>6.0%}" for p, g in zip(r["ppl"], gaps)) + " |")
    print(f"total {time.perf_counter() - start:.0f} s; outputs in {out}")


if __name__ == "__main__":
    main()
