"""The real SmolLM2-135M on real WikiText-2: llmc's numbers equal an independent transformers loop.

The closing-note figures use 21 windows (`llmc run configs/quickstart/rtn_w4g64_smollm2.yml
eval.num_samples=21`); CI checks the same equalities on the first window to stay fast.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmc_core import config
from llmc_core.run import Run

pytestmark = pytest.mark.slow
WINDOWS, SEQ = 1, 2048


def _reference_ppl(model, ids):
    nll = 0.0
    with torch.no_grad():
        for i in range(WINDOWS):
            w = ids[i * SEQ : (i + 1) * SEQ][None]
            logits = model(input_ids=w).logits
            nll += torch.nn.functional.cross_entropy(logits[0, :-1].float(), w[0, 1:], reduction="sum").item()
    return math.exp(nll / (WINDOWS * (SEQ - 1)))


def _reference_rtn_(model, bit, group):
    """Asymmetric min/max RTN written out independently of llmc_core.quant."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight.reshape(-1, group)
                lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
                scale = (hi - lo).clamp(min=1e-5) / (2**bit - 1)
                zero = torch.round(-lo / scale).clamp(0, 2**bit - 1)
                q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bit - 1)
                module.weight.copy_(((q - zero) * scale).reshape(module.weight.shape))


def test_smollm2_pretrain_and_rtn_match_independent_loop(smollm2_path, shared_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config.load(
        "configs/quickstart/rtn_w4g64_smollm2.yml",
        [f"eval.num_samples={WINDOWS}", f"save.save_path={tmp_path / 'out'}", f"eval.path={shared_data / 'wikitext2' / 'wiki.test.raw'}"],
    )
    records = {r.position: r.value for r in Run(cfg).execute()}

    folder, name = smollm2_path.parent, smollm2_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    rows = ["" if not line.strip() else line for line in open(shared_data / "wikitext2" / "wiki.test.raw", encoding="utf-8", newline="")]
    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids[0]
    assert ids.numel() == 304_986  # the whole split, as documented in shared/data/README.md

    assert records["pretrain"] == pytest.approx(_reference_ppl(model, ids), abs=5e-4)
    _reference_rtn_(model, bit=4, group=64)
    assert records["fake_quant"] == pytest.approx(_reference_ppl(model, ids), abs=5e-4)
    assert records["fake_quant"] > records["pretrain"]
    assert (tmp_path / "out" / "fake_quant_model" / "model.safetensors").is_file()
