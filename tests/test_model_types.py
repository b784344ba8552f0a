"""``model.type: auto``, unsupported checkpoints, the weight counts and refusals, save_awq per
family kind, and experts that receive no calibration tokens (tiny models, no download)."""

from __future__ import annotations

import logging

import pytest
import torch

from llmc_core import config
from llmc_core.errors import LlmcError
from llmc_core.run import Run
from llmc_core.testing import run_cli, run_config, save_tiny_model, tiny_model, word_tokenizer, write_config

DENSE = ("gemma2", "phi3", "qwen3")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from llmc_core.testing import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def save_other(folder, model_type, **kw):
    """A tiny model of a family llmc has no table for, saved with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def quick(cfg, **eval_overrides):
    cfg["model"]["type"] = "auto"
    cfg["eval"].update(num_samples=1, **eval_overrides)
    return cfg


def test_auto_on_an_unsupported_model_runs_rtn_and_awq_refuses_in_one_line(corpus, tmp_path, caplog):
    folder = save_other(tmp_path / "olmo", "olmo")
    cfg = quick(run_config(folder, corpus, tmp_path / "rtn", method="rtn", eval_pos=("fake_quant",)))
    with caplog.at_level(logging.INFO, logger="llmc"):
        Run(config.validate(cfg)).execute()
    assert "no llmc family supports" in caplog.text and "qwen3" in caplog.text and "RTN works" in caplog.text
    assert "will quantize 14 weights (6 MLP, 8 attention)" in caplog.text
    cfg = quick(run_config(folder, corpus, tmp_path / "awq", method="awq", eval_pos=("fake_quant",)))
    with pytest.raises(LlmcError) as err:
        Run(config.validate(cfg)).execute()
    (line,) = err.value.problems
    assert "'olmo' is no supported family" in line and "gemma2" in line and "quant.method: RTN" in line


def test_a_model_with_nothing_to_quantize_is_refused_before_any_work(corpus, tmp_path):
    folder = save_other(tmp_path / "gpt2", "gpt2", n_positions=512)  # GPT-2's Conv1D layers are no nn.Linear
    cfg = quick(run_config(folder, corpus, tmp_path / "out", method="rtn", eval_pos=("pretrain", "fake_quant")))
    run = Run(config.validate(cfg))
    with pytest.raises(LlmcError, match="would quantize nothing"):
        run.execute()
    assert not run.results  # refused before the pretrain evaluation


def test_an_explicit_type_is_checked_against_the_checkpoint(corpus, tmp_path):
    folder = save_tiny_model(tmp_path / "qwen3", "qwen3")
    cfg = run_config(folder, corpus, tmp_path / "out", method="rtn", eval_pos=("fake_quant",))
    with pytest.raises(LlmcError, match="expects a llama checkpoint, but .* is 'qwen3'. Set model.type: auto"):
        Run(config.validate(cfg)).execute()


@pytest.mark.parametrize("model_type", DENSE)
def test_save_awq_of_a_dense_family_loads_to_the_fake_quant_logits(model_type, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmc_plugins.savers.awq_format import load_awq_folder

    folder = save_tiny_model(tmp_path / "model", model_type)
    cfg = quick(run_config(folder, corpus, tmp_path / "out", method="rtn", group_size=16, eval_pos=("fake_quant",)))
    cfg["quant"]["weight"]["scale_dtype"] = "float16"
    cfg["save"].update(save_fake=True, save_awq=True)
    run = Run(config.validate(cfg))
    run.execute()
    packed = load_awq_folder(tmp_path / "out" / "awq_model")
    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "fake_quant_model", dtype=torch.float32).eval()
    ids = torch.randint(4, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, fake(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", MOE)
def test_moe_save_awq_and_real_quant_are_refused_before_any_work(model_type, corpus, tmp_path):
    folder = save_tiny_model(tmp_path / "model", model_type)
    cfg = quick(run_config(folder, corpus, tmp_path / "out", method="rtn", group_size=16, eval_pos=("pretrain", "real_quant")))
    cfg["save"]["save_awq"] = True
    run = Run(config.validate(cfg))
    with pytest.raises(LlmcError) as err:
        run.execute()
    assert len(err.value.problems) == 2 and all("fused 3-D tensors" in p and "save.save_fake" in p for p in err.value.problems)
    assert not run.results


def test_an_expert_without_calibration_tokens_is_still_quantized(caplog):
    from llmc_core.blockwise import BlockContext, capture_block_inputs, run_blocks
    from llmc_core.quant import QuantSpec
    from llmc_plugins.methods.awq import Awq
    from llmc_plugins.methods.awq.method import AwqConfig
    from llmc_plugins.models.families import Mixtral

    model = tiny_model("mixtral")

    def never_expert_3(module, args, out):  # the router sends expert 3's tokens to expert 0
        logits, scores, index = out
        return logits, scores, torch.where(index == 3, torch.zeros_like(index), index)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_expert_3)
    adapter = Mixtral().adapter(model)
    spec = QuantSpec(bit=3, granularity="per_group", group_size=16)
    method = Awq(AwqConfig(n_grid=4, search_dtype="float32"), spec)
    method.check_model(adapter)
    before = model.model.layers[0].mlp.experts.down_proj[3].detach().clone()
    ids = [torch.randint(4, 128, (2, 32))]
    inputs, kwargs = capture_block_inputs(model, adapter, ids, torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="llmc.awq"):
        run_blocks(adapter, inputs, kwargs, torch.device("cpu"), method.transform_block)
    assert "1 of 4 got fewer than 16 calibration tokens" in caplog.text
    assert {"block": 0, "group": "down.3", "skipped": "no calibration tokens"} in method.log
    block = adapter.blocks()[0]
    quantized = method.quantize_block(BlockContext(0, block, adapter.block_prefix(0), adapter, [], [], torch.device("cpu")))
    assert "model.layers.0.mlp.experts.3.down_proj" in quantized and "model.layers.0.mlp.gate" not in str(list(quantized))
    after = block.mlp.experts.down_proj[3]
    assert not torch.equal(after, before)
    groups = torch.sort(after.reshape(-1, 16), dim=-1).values
    assert int((1 + (groups.diff(dim=-1) != 0).sum(-1)).max()) <= 8


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MOE)
def test_moe_family_through_the_cli_with_auto(model_type, corpus, tmp_path):
    folder = save_tiny_model(tmp_path / "model", model_type)
    cfg = run_config(folder, corpus, tmp_path / "out", method="awq", group_size=16, eval_pos=("pretrain", "transformed", "fake_quant"), special={"n_grid": 10})
    cfg["model"]["type"] = "auto"
    cfg["save"].update(save_trans=True, save_fake=True)
    result = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)))
    assert result.exit_code == 0, result.stderr
    from llmc_core.testing import read_results

    res = read_results(tmp_path / "out")
    assert res[("transformed", "ppl", "custom", "perplexity")] == pytest.approx(res[("pretrain", "ppl", "custom", "perplexity")], rel=1e-4)
    assert (tmp_path / "out" / "fake_quant_model" / "model.safetensors").is_file()
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "experts" in report and "router (stays float)" in report


def test_an_explicit_type_on_an_unsupported_checkpoint_names_the_supported_ones(corpus, tmp_path):
    folder = save_other(tmp_path / "olmo", "olmo")
    cfg = run_config(folder, corpus, tmp_path / "out", method="rtn", eval_pos=("fake_quant",))
    with pytest.raises(LlmcError) as err:
        Run(config.validate(cfg)).execute()
    (line,) = err.value.problems
    assert "No llmc family supports 'olmo'" in line and "qwen3_moe" in line and "model.type: auto, quant.method: RTN works" in line
