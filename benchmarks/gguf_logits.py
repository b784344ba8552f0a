"""llama.cpp's logits for llmc's GGUF file against llmc's ``fake_quant`` model, on the same token ids.

llama.cpp does not compute in float32 throughout: its CPU matrix products with quantized weights
round the activations to 8-bit blocks first (Q8_0 / Q8_1), and it keeps other tensors in float16.
So "equal to within llama.cpp's own compute precision" is measured, not assumed: the same
comparison is made for a file llama.cpp quantized itself (``llama-quantize``, same type) against
that file's own weights dequantized into the float model (transformers, float32), so both rows
show how far llama.cpp's compute is from an exact float32 forward of the weights it holds.

    python benchmarks/gguf_logits.py --llmc SAVE_PATH --reference-gguf llama_q4_0.gguf --hf HF_FOLDER \\
        [--llamacpp /work/llamacpp] [--tokens 256]

``SAVE_PATH`` holds ``fake_quant_model/`` and ``gguf_model/model.gguf`` (``save_fake`` and
``save_gguf`` on). Prints max / mean |logit difference|, the logits' own spread, top-1 agreement
and the mean KL divergence per position, for both rows, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parent))  # after site-packages: a benchmark script must not shadow a package
from peers import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMC_DATA", ROOT.parent / "shared" / "data"))

# run inside the llama.cpp venv: logits of every position for the given token ids
WORKER = """
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["model"], n_ctx=len(job["ids"]), logits_all=True, n_threads=2, verbose=False)
llm.eval(job["ids"])
np.save(job["out"], np.asarray(llm.scores[: len(job["ids"])], dtype=np.float32))
"""


def llama_cpp_logits(python: Path, model: Path, ids: list[int]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        job, out, worker = Path(tmp) / "job.json", Path(tmp) / "logits.npy", Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        job.write_text(json.dumps({"model": str(model), "ids": ids, "out": str(out)}))
        subprocess.run([str(python), str(worker), str(job)], check=True)
        return np.load(out)


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_as_float_model(gguf_file: Path, hf: Path):
    """The float model with every tensor of ``gguf_file`` dequantized (transformers' GGUF loader)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, trust_remote_code=False).eval()


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """``a``: llama.cpp's logits, ``b``: the float32 forward's."""
    diff = np.abs(a - b)
    la = torch.log_softmax(torch.from_numpy(a), -1)
    lb = torch.log_softmax(torch.from_numpy(b), -1)
    kl = float((lb.exp() * (lb - la)).sum(-1).mean())
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "logit_std": float(b.std()), "top1_agree": float((a.argmax(-1) == b.argmax(-1)).mean()), "kl": kl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llmc", type=Path, required=True, help="save_path with fake_quant_model/ and gguf_model/model.gguf")
    ap.add_argument("--reference-gguf", type=Path, help="a file llama-quantize made of the same type (the compute-precision row)")
    ap.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp"))
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    python = args.llamacpp / "venv" / "bin" / "python"
    fake = args.llmc / "fake_quant_model"
    tok = AutoTokenizer.from_pretrained(fake, trust_remote_code=False)
    text = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    ids = tok(text).input_ids[: args.tokens]
    rows = []
    ours = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32, trust_remote_code=False).eval()
    rows.append(("llmc file vs llmc fake_quant (float32)", compare(llama_cpp_logits(python, args.llmc / "gguf_model" / "model.gguf", ids), torch_logits(ours, ids))))
    if args.reference_gguf:
        theirs = gguf_as_float_model(args.reference_gguf, fake)
        rows.append(("llama-quantize file vs its own weights dequantized (float32)", compare(llama_cpp_logits(python, args.reference_gguf, ids), torch_logits(theirs, ids))))
    print(f"\nSmolLM2-135M on {cpu_name()}; {len(ids)} WikiText-2 test tokens; llama.cpp (llama-cpp-python) vs transformers float32")
    print("| comparison | max abs | mean abs | logit std | top-1 agree | mean KL |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['max_abs']:.4f} | {r['mean_abs']:.4f} | {r['logit_std']:.3f} | {r['top1_agree'] * 100:.1f}% | {r['kl']:.2e} |")
    (args.llmc / "gguf_logits.json").write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
