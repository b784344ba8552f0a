"""Every supported model family, on tiny random models built in memory (no download).

Per family: AWQ's folding is exact (``transformed`` logits equal ``pretrain``), the saved
fake-quantized folder reloads with plain transformers to llmc's logits and holds at most 2^bits
values per quantization group in every block weight except routers, and AWQ beats RTN on the
block output for most linear groups.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llmc_core.blockwise import capture_block_inputs, run_blocks
from llmc_core.layer_ops import original_weight, set_weight
from llmc_core.quant import QuantSpec
from llmc_core.quant.fake import fake_quantize
from llmc_core.testing import FAMILY_CONFIGS, tiny_model
from llmc_plugins.methods.awq import Awq
from llmc_plugins.methods.awq.method import AwqConfig
from llmc_plugins.models.families import FAMILIES

FAMILY_OF = {t: f for f in FAMILIES for t in f.model_types}
TYPES = sorted(FAMILY_CONFIGS)
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
SPEC = QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=16)
CPU = torch.device("cpu")


def batches(n=2, bs=2, seq=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (bs, seq), generator=gen) for _ in range(n)]


def awq(model, adapter, data, spec=SPEC, **special):
    method = Awq(AwqConfig(**special), spec)
    method.check_model(adapter)
    inputs, kwargs = capture_block_inputs(model, adapter, data, CPU)
    run_blocks(adapter, inputs, kwargs, CPU, method.transform_block)
    return method


@pytest.mark.parametrize("model_type", TYPES)
def test_awq_fold_is_exact(model_type):
    model = tiny_model(model_type)
    adapter = FAMILY_OF[model_type]().adapter(model)
    ids = batches(1, seed=5)[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    method = awq(model, adapter, batches(), n_grid=5, search_dtype="float32")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert any("alpha" in e for e in method.log)  # scales were searched and folded
    rel = float((after - before).abs().max() / before.abs().max())
    assert rel < 1e-5, f"{model_type}: transformed logits differ from pretrain by {rel:.2e} (relative)"


@pytest.mark.parametrize("model_type", TYPES)
def test_every_block_weight_is_found_and_routers_stay_float(model_type):
    model = tiny_model(model_type)
    adapter = FAMILY_OF[model_type]().adapter(model)
    block = adapter.blocks()[0]
    names = set(adapter.quant_linears(block))
    assert any(n.startswith("self_attn.") for n in names) and any(n.startswith("mlp.") for n in names)
    if model_type in MOE:
        experts = {n for n in names if n.startswith("mlp.experts.")}
        assert len(experts) == 2 * 4  # gate_up and down of each of the 4 experts
        assert not any(n.startswith(("mlp.gate", "mlp.shared_expert_gate")) for n in names)


def group_layers(adapter, block):
    """The 4 linear groups of a block as the brief counts them: qkv, o, gate/up, down (all experts' downs together)."""
    out: dict[str, list[str]] = {}
    for g in adapter.linear_groups(block):
        key = "down" if "down" in g.name else g.name
        out.setdefault(key, []).extend(g.layers)
    return out


def block_error(adapter, block, layers, inputs, kwargs, reference):
    """Block output MSE with only ``layers`` RTN-quantized."""
    saved = {n: original_weight(adapter.get(block, n)) for n in layers}
    try:
        with torch.no_grad():
            for n in layers:
                w = adapter.get(block, n)
                set_weight(w, fake_quantize(w.weight.clone(), SPEC))
            out = [block(h, **kw) for h, kw in zip(inputs, kwargs)]
    finally:
        for n, w in saved.items():
            set_weight(adapter.get(block, n), w)
    return sum(float((o - r).pow(2).sum()) for o, r in zip(out, reference))


@pytest.mark.parametrize("model_type", TYPES)
def test_awq_beats_rtn_on_most_linear_groups(model_type):
    model = tiny_model(model_type, kv_heads=4)  # no GQA: the o_proj group is searched too
    family = FAMILY_OF[model_type]()
    float_model = copy.deepcopy(model)
    adapter, float_adapter = family.adapter(model), family.adapter(float_model)
    awq(model, adapter, batches(2), n_grid=10, search_dtype="float32")
    held_out = batches(2, seed=9)
    inputs, kwargs = capture_block_inputs(float_model, float_adapter, held_out, CPU)
    block, float_block = adapter.blocks()[0], float_adapter.blocks()[0]
    with torch.no_grad():
        reference = [float_block(h, **kw) for h, kw in zip(inputs, kwargs)]
    groups = group_layers(adapter, block)
    assert len(groups) == 4, groups
    wins = {}
    for key, layers in groups.items():
        e_awq = block_error(adapter, block, layers, inputs, kwargs, reference)
        e_rtn = block_error(float_adapter, float_block, layers, inputs, kwargs, reference)
        wins[key] = (e_awq < e_rtn, round(e_awq / e_rtn, 3))
    print(f"{model_type}: AWQ/RTN block error per group {wins}")
    assert sum(w for w, _ in wins.values()) >= 3, f"{model_type}: AWQ/RTN block error per group {wins}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from llmc_core.testing import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def block_matrices(state, blocks_path="model.layers"):
    """Every block weight of a state dict except routers, as ``{name: tensor}``."""
    return {n: t for n, t in state.items() if n.startswith(f"{blocks_path}.") and t.dim() >= 2 and not n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))}


def max_distinct_per_group(w: torch.Tensor, group: int) -> int:
    rows = torch.sort(w.float().reshape(-1, group), dim=-1).values
    return int((1 + (rows.diff(dim=-1) != 0).sum(-1)).max())


@pytest.mark.parametrize("model_type", TYPES)
def test_run_auto_saves_a_fake_quant_folder_that_transformers_reloads(model_type, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmc_core import config
    from llmc_core.run import Run
    from llmc_core.testing import run_config, save_tiny_model

    folder = save_tiny_model(tmp_path / "model", model_type)
    cfg = run_config(folder, corpus, tmp_path / "out", method="awq", bit=3, group_size=16, eval_pos=("pretrain", "transformed", "fake_quant"), special={"n_grid": 4})
    cfg["model"]["type"] = "auto"
    cfg["eval"]["num_samples"] = 2
    cfg["save"].update(save_trans=True, save_fake=True)
    run = Run(config.validate(cfg))
    records = {r.position: r.value for r in run.execute()}
    assert records["transformed"] == pytest.approx(records["pretrain"], rel=1e-4)
    assert records["fake_quant"] != records["pretrain"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "fake_quant_model", dtype=torch.float32).eval()
    ids = batches(1, seed=3)[0]
    with torch.no_grad():
        ours, theirs = run.model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    weights = block_matrices(reloaded.state_dict())
    assert weights and all(max_distinct_per_group(w, 16) <= 2**3 for w in weights.values()), [n for n, w in weights.items() if max_distinct_per_group(w, 16) > 8]
    n_quantized = len(run.quantized)
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert f"({n_quantized} weights)" in report
    print(f"{model_type}: {n_quantized} weights quantized; ppl pretrain {records['pretrain']:.3f} transformed {records['transformed']:.3f} fake_quant {records['fake_quant']:.3f}")
