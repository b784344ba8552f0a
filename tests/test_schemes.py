"""Weight + activation schemes end to end on tiny models: config expansion, activation quantizers
from fake_quant on (absent at transformed), static scales, and compressed-tensors exports loaded
back by transformers + compressed-tensors' own quantized forward."""

from __future__ import annotations

import json

import pytest
import torch

from llmc_core import hookimpl
from llmc_core.config import validate
from llmc_core.errors import LlmcError
from llmc_core.quant.scheme import PRESETS, Scheme
from llmc_core.quant.spec import QuantSpec
from llmc_core.testing import read_results, run_cli, run_config, write_config, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def _cfg(tmp_path, model_dir, corpus, scheme=None, weight=None, act=None, kvcache=None, method="rtn", eval_pos=("pretrain", "transformed", "fake_quant"), **save):
    cfg = run_config(model_dir, corpus, tmp_path / "out", method=method, eval_pos=eval_pos)
    q = cfg["quant"]
    del q["weight"]
    for key, value in (("scheme", scheme), ("weight", weight), ("act", act), ("kvcache", kvcache)):
        if value is not None:
            q[key] = value
    cfg["save"].update(save)
    cfg["eval"]["num_samples"] = 4
    return cfg


# -- the config ---------------------------------------------------------------------------------


def test_every_preset_matches_compressed_tensors_own_table():
    ct = pytest.importorskip("compressed_tensors.quantization.quant_scheme")
    from llmc_plugins.savers.ct_format import ct_scheme

    for name, parts in PRESETS.items():
        ours = ct_scheme(Scheme(QuantSpec.model_validate(parts["weight"]), QuantSpec.model_validate(parts["act"]) if "act" in parts else None))
        theirs = ct.PRESET_SCHEMES[name]
        for role, key in (("weights", "weights"), ("input_activations", "input_activations")):
            a, b = getattr(ours, role), theirs.get(key)
            assert (a is None) == (b is None), (name, role)
            if a is None:
                continue
            for field in ("num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "dynamic", "scale_dtype"):
                assert getattr(a, field) == getattr(b, field), (name, role, field, getattr(a, field), getattr(b, field))


def test_a_preset_expands_and_an_explicit_key_that_contradicts_it_is_one_line(tiny_model_dir, corpus, tmp_path):
    cfg = validate(_cfg(tmp_path, tiny_model_dir, corpus, scheme="fp8_dynamic"))
    assert cfg.scheme.weight.is_float and cfg.scheme.weight.granularity == "per_channel"
    assert cfg.scheme.act.granularity == "per_token" and not cfg.scheme.act.static
    with pytest.raises(LlmcError) as exc:
        validate(_cfg(tmp_path, tiny_model_dir, corpus, scheme="FP8_DYNAMIC", weight={"granularity": "per_tensor"}))
    (line,) = exc.value.problems
    assert line.startswith("quant.weight.granularity:") and "FP8_DYNAMIC" in line


@pytest.mark.parametrize(
    ("weight", "act", "where"),
    [
        ({"bit": 8, "symmetric": True, "granularity": "per_token"}, None, "quant.weight.granularity"),
        ({"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_tensor", "group_size": 64}, None, "quant.weight"),
        ({"bit": 8, "symmetric": True, "granularity": "per_channel"}, {"bit": 8, "symmetric": False, "granularity": "per_tensor", "static": True}, "quant.act"),
        ({"bit": 8, "symmetric": True, "granularity": "per_channel"}, {"bit": 8, "granularity": "per_block", "block_size": 32}, "quant.act.granularity"),
        ({"quant_type": "float-quant", "bit": "e4m3", "symmetric": False, "granularity": "per_channel"}, None, "quant.weight"),
    ],
)
def test_impossible_schemes_are_refused_before_the_model_loads(tiny_model_dir, corpus, tmp_path, weight, act, where):
    with pytest.raises(LlmcError) as exc:
        validate(_cfg(tmp_path, tiny_model_dir, corpus, weight=weight, act=act))
    assert any(line.startswith(where) for line in exc.value.problems), exc.value.problems


def test_savers_and_methods_say_which_schemes_they_take(tiny_model_dir, corpus, tmp_path):
    with pytest.raises(LlmcError) as exc:
        validate(_cfg(tmp_path, tiny_model_dir, corpus, scheme="FP8_DYNAMIC", save_awq=True))
    assert any(line.startswith("save.save_awq:") for line in exc.value.problems)
    with pytest.raises(LlmcError) as exc:
        validate(_cfg(tmp_path, tiny_model_dir, corpus, scheme="FP8_DYNAMIC", method="awq"))
    assert any(line.startswith("quant.method: awq:") for line in exc.value.problems)
    with pytest.raises(LlmcError) as exc:
        validate(_cfg(tmp_path, tiny_model_dir, corpus, scheme="NVFP4A16", eval_pos=("fake_quant", "real_quant")))
    assert any(line.startswith("eval.eval_pos: real_quant:") for line in exc.value.problems)


def test_a_static_scheme_needs_calibration_even_with_rtn(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, corpus, scheme="FP8")
    del cfg["calib"]
    with pytest.raises(LlmcError) as exc:
        validate(cfg)
    assert any(line.startswith("calib:") and "static" in line for line in exc.value.problems)


# -- the run --------------------------------------------------------------------------------------


def _ppl(save_path, position):
    return read_results(save_path)[(position, "ppl", "custom", "perplexity")]


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "W8A8", "FP8"])
def test_activation_quantizers_live_from_fake_quant_and_not_at_transformed(tiny_model_dir, corpus, tmp_path, scheme):
    """transformed equals pretrain (RTN's transform is nothing); fake_quant differs from a
    weight-only run of the same weights because the activations are quantized too."""
    full = _cfg(tmp_path / "a", tiny_model_dir, corpus, scheme=scheme)
    res = run_cli("run", str(write_config(tmp_path / "a.yml", full)))
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "a" / "out"
    assert _ppl(out, "transformed") == pytest.approx(_ppl(out, "pretrain"), rel=1e-6)
    weights_only = _cfg(tmp_path / "b", tiny_model_dir, corpus, weight=PRESETS[scheme]["weight"])
    res = run_cli("run", str(write_config(tmp_path / "b.yml", weights_only)))
    assert res.exit_code == 0, res.stderr
    assert _ppl(out, "fake_quant") != _ppl(tmp_path / "b" / "out", "fake_quant")


def _independent_fake_quant(model, scheme, act_scales, weights=True, layers=None, int_div=127.0):
    """A reference written here, apart from llmc's runner: quantize every decoder linear's weight
    (or those named in ``layers``) with llmc_core.quant, and its input with a per-token / static
    rule spelled out in the test. ``int_div``: a symmetric int8 per-token scale is ``max|x| /
    int_div`` (127 in vLLM's kernels and llmc, 127.5 in compressed-tensors' own forward)."""
    from llmc_core.quant.fake import fake_quantize

    fp8 = torch.float8_e4m3fn

    def act(x, spec, name):
        x32 = x.float()
        if spec.static:
            s = act_scales[name]
        elif spec.granularity == "per_group":
            g = x32.unflatten(-1, (-1, spec.group_size))
            s = g.abs().amax(dim=-1, keepdim=True) / 448.0
            q = (g / s).clamp(-448, 448).to(fp8).float()
            return (q * s).flatten(-2).to(x.dtype)
        else:
            s = x32.abs().amax(dim=-1, keepdim=True) / (448.0 if spec.is_float else int_div)
            s = torch.where(s == 0, torch.finfo(torch.float32).eps, s)
        if spec.is_float:
            q = (x32 / s).clamp(-448, 448).to(fp8).float()
        else:
            q = (x32 / s).round().clamp(-128, 127)
        return (q * s).to(x.dtype)

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (name in layers if layers is not None else ".layers." in name):
            if weights:
                mod.weight.data = fake_quantize(mod.weight.data, scheme.weight)
            mod.register_forward_pre_hook(lambda m, args, name=name: (act(args[0], scheme.act, name),))
    return model


@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "W8A8", "FP8"])
def test_fake_quant_equals_an_independent_loop_and_the_compressed_tensors_folder(tiny_model_dir, corpus, tmp_path, scheme):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, tiny_model_dir, corpus, scheme=scheme, eval_pos=("fake_quant",), save_vllm=True, save_fake=True)
    res = run_cli("run", str(write_config(tmp_path / "c.yml", cfg)))
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "out"
    qcfg = json.loads((out / "vllm_quant_model" / "config.json").read_text())["quantization_config"]
    expected_format = {"FP8_DYNAMIC": "float-quantized", "FP8": "float-quantized", "W8A8": "int-quantized"}[scheme]
    assert qcfg["format"] == expected_format and qcfg["config_groups"]["group_0"]["input_activations"] is not None

    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    from safetensors.torch import load_file

    qparams = load_file(str(out / "fake_quant_model" / "llmc_qparams.safetensors"))
    act_scales = {k.removesuffix(".input_scale"): v for k, v in qparams.items() if k.endswith(".input_scale")}
    sch = validate({k: v for k, v in cfg.items() if k != "save"}).scheme
    ref = _independent_fake_quant(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, trust_remote_code=False).eval(), sch, act_scales)
    ct = AutoModelForCausalLM.from_pretrained(out / "vllm_quant_model", dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        ref_logits, ct_logits = ref(ids).logits, ct(ids).logits
    # compressed-tensors' symmetric int8 activation scale is max|x| / 127.5 where vLLM's kernels
    # (and llmc) use / 127: agreement is then to int8 rounding, not bit for bit
    tol = 2e-2 if scheme == "W8A8" else 1e-4
    assert torch.allclose(ref_logits, ct_logits, atol=tol, rtol=0), (ref_logits - ct_logits).abs().max()
    if scheme == "FP8":
        assert set(act_scales) and all(v.numel() == 1 for v in act_scales.values())


@pytest.mark.parametrize("scheme", ["NVFP4A16", "MXFP4A16", "FP8_BLOCK"])
def test_float_weight_exports_decompress_to_llmcs_weights(tiny_model_dir, corpus, tmp_path, scheme):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    weight = dict(PRESETS[scheme]["weight"])
    act = PRESETS[scheme].get("act")
    if scheme == "FP8_BLOCK":  # the tiny model's layers are 64 and 128 wide
        weight["block_size"], act = [32, 32], {**act, "group_size": 32}
    cfg = _cfg(tmp_path, tiny_model_dir, corpus, weight=weight, act=act, eval_pos=("fake_quant",), save_vllm=True, save_fake=True)
    res = run_cli("run", str(write_config(tmp_path / "c.yml", cfg)))
    assert res.exit_code == 0, res.stderr
    # compressed-tensors decompresses FP4 weights to bfloat16 (a float32 load then fails in its
    # forward), so FP4 folders are compared in bfloat16: llmc's weights rounded the same way
    dtype = torch.bfloat16 if "FP4" in scheme else torch.float32
    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "fake_quant_model", dtype=dtype, trust_remote_code=False)
    if act is not None:  # the fake folder holds the weights; its activation scheme is applied here
        fake = _independent_fake_quant(fake, validate({k: v for k, v in cfg.items() if k != "save"}).scheme, {}, weights=False)
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "vllm_quant_model", dtype=dtype, trust_remote_code=False)
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = fake(ids).logits.float(), ct(ids).logits.float()
    assert torch.allclose(a, b, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0), (a - b).abs().max()


def test_gptq_runs_a_float_scheme_and_beats_rtn_on_the_layers(tiny_model_dir, corpus, tmp_path):
    results = {}
    for method in ("rtn", "gptq"):
        cfg = _cfg(tmp_path / method, tiny_model_dir, corpus, scheme="NVFP4A16", method=method, eval_pos=("fake_quant",))
        if method == "gptq":
            cfg["quant"]["special"] = {"forward_dtype": "float32"}
        res = run_cli("run", str(write_config(tmp_path / f"{method}.yml", cfg)))
        assert res.exit_code == 0, res.stderr
        results[method] = _ppl(tmp_path / method / "out", "fake_quant")
    assert results["gptq"] < results["rtn"], results


# -- every family ---------------------------------------------------------------------------------

FAMILY_TYPES = sorted(__import__("llmc_core.testing", fromlist=["FAMILY_CONFIGS"]).FAMILY_CONFIGS)
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


class _HookCounter:
    """At each evaluation: how many quantized layers carry a forward pre-hook (the activation quantizer)."""

    def __init__(self):
        self.seen = {}

    @staticmethod
    def _count(run):
        names = run.quantized or {n: None for n in run.adapter.named_quant_linears()}
        hooks = (run.model.get_submodule(n)._forward_pre_hooks.values() for n in names)
        return sum(1 for hs in hooks if any(getattr(h, "llmc_quantizer", None) is not None for h in hs))

    @hookimpl
    def llmc_evaluation_done(self, run, record):
        self.seen[record.position] = self._count(run)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_family_quantizes_activations_from_fake_quant_on_and_exports_w8a8(model_type, corpus, tmp_path):
    """Activation quantizers are on every quantized layer at fake_quant and on none at pretrain /
    transformed; the KV cache is quantized (fake_quant moves with it); the W8A8 compressed-tensors
    folder reloads in transformers + compressed-tensors to llmc's logits (int8 rounding apart)."""
    from transformers import AutoModelForCausalLM

    from llmc_core import config
    from llmc_core.run import Run
    from llmc_core.testing import registered, save_tiny_model

    folder = save_tiny_model(tmp_path / "model", model_type)
    cfg = _cfg(tmp_path, folder, corpus, scheme="W8A8", save_vllm=True)
    cfg["model"]["type"] = "auto"
    if model_type in MOE:  # fused 3-D experts have no per-expert module to hook: refused before any work
        with pytest.raises(LlmcError) as exc:
            Run(config.validate(cfg)).execute()
        assert any(line.startswith("quant.act:") and "experts" in line for line in exc.value.problems), exc.value.problems
        return
    counter = _HookCounter()
    with registered(counter, name=f"hook-counter-{model_type}"):
        run = Run(config.validate(cfg))
        records = {r.position: r.value for r in run.execute()}
    n = len(run.quantized)
    assert n and counter.seen == {"pretrain": 0, "transformed": 0, "fake_quant": n}, counter.seen
    assert records["transformed"] == pytest.approx(records["pretrain"], rel=1e-6)
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "vllm_quant_model", dtype=torch.float32, trust_remote_code=False).eval()
    scheme = run.config.scheme
    ref = {d: _independent_fake_quant(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval(), scheme, {}, layers=set(run.quantized), int_div=d) for d in (127.0, 127.5)}
    ids = torch.randint(4, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = run.model(input_ids=ids).logits, ct(input_ids=ids).logits
        ref_llmc, ref_ct = ref[127.0](input_ids=ids).logits, ref[127.5](input_ids=ids).logits
    torch.testing.assert_close(ours, ref_llmc, rtol=0, atol=1e-4)  # llmc's fake_quant: weights and activations as written here
    torch.testing.assert_close(theirs, ref_ct, rtol=0, atol=1e-4)  # the folder, run by compressed-tensors: the same weights, its own scale rule


def test_token_consistency_is_recorded_against_pretrain(tiny_model_dir, corpus, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, corpus, weight={"bit": 2, "symmetric": True, "granularity": "per_channel"}, act={"bit": 4, "symmetric": True, "granularity": "per_token"}, eval_pos=("pretrain", "fake_quant"))
    cfg["eval"]["eval_token_consist"] = True
    res = run_cli("run", str(write_config(tmp_path / "c.yml", cfg)))
    assert res.exit_code == 0, res.stderr
    res = read_results(tmp_path / "out")
    same = res[("fake_quant", "ppl", "custom", "token_consistency")]
    assert 0.0 < same < 1.0  # W2A4 keeps some of a random tiny model's argmax tokens, not all
    assert ("pretrain", "ppl", "custom", "token_consistency") not in res


@pytest.mark.parametrize("scheme", ["W8A8", "FP8_DYNAMIC", "FP8"])
def test_real_quant_runs_8_bit_kernels_and_equals_fake_quant(tiny_model_dir, corpus, tmp_path, scheme):
    """real_quant swaps in W8A8Linear (torch._int_mm / torch._scaled_mm on 8-bit operands): the
    same numbers as fake_quant up to float32 summation order, and the layers really hold 8-bit weights."""
    from llmc_core import config
    from llmc_core.quant.w8a8 import W8A8Linear
    from llmc_core.run import Run

    seen = {}

    class Probe:
        @hookimpl
        def llmc_evaluation_done(self, run, record):
            seen[record.position] = [type(m).__name__ for m in run.model.modules() if isinstance(m, W8A8Linear) and m.weight.element_size() == 1]

    cfg = _cfg(tmp_path, tiny_model_dir, corpus, scheme=scheme, eval_pos=("fake_quant", "real_quant"))
    from llmc_core.testing import registered

    with registered(Probe(), name=f"probe-{scheme}"):
        run = Run(config.validate(cfg))
        records = {r.position: r.value for r in run.execute()}
    assert len(seen["real_quant"]) == len(run.quantized) and not seen["fake_quant"]
    assert records["real_quant"] == pytest.approx(records["fake_quant"], rel=1e-4)
    assert not any(isinstance(m, W8A8Linear) for m in run.model.modules())  # the float layers are back


def test_savers_get_a_narrow_view_that_still_serves_old_plugins(tiny_model_dir, corpus, tmp_path):
    """A saver is handed the saver view: its fields read through; anything else of the run is
    still served (a plugin written before role views keeps working) with a DeprecationWarning;
    writing to the run is refused."""
    from llmc_core.api import Saver
    from llmc_core.testing import registered

    seen = {}

    class Peek(Saver):
        name = "peek"
        folder = "peek_model"

        def save(self, state, folder):
            seen["type"] = type(state).__name__
            seen["layers"] = len(state.quantized)
            with pytest.warns(DeprecationWarning, match="calib_batches"):
                seen["batches"] = state.calib_batches
            with pytest.raises(AttributeError):
                state.model = None

    class Plugin:
        @hookimpl
        def llmc_register_savers(self, register):
            register(Peek)

    with registered(Plugin(), name="peek-saver"):
        cfg = _cfg(tmp_path, tiny_model_dir, corpus, weight={"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}, eval_pos=("fake_quant",), save_peek=True)
        res = run_cli("run", str(write_config(tmp_path / "c.yml", cfg)))
    assert res.exit_code == 0, res.stderr
    assert seen["type"] == "RoleView" and seen["layers"] == 14 and seen["batches"] == []


def test_mse_activation_observer_clips_outliers_and_matches_a_brute_force_search():
    """``calib_algo: mse`` for a static per-tensor int4 activation: the threshold is the grid
    point a search written here finds, below ``max|x|`` for a heavy-tailed input."""
    from llmc_core.quant.fake import act_mse_threshold, fake_quantize_act, static_scale

    spec = QuantSpec(bit=4, symmetric=True, granularity="per_tensor", static=True, calib_algo="mse")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g) * torch.randn(300, 64, generator=g).exp()  # heavy tails: clipping pays
    amax = float(x.abs().amax())
    errs = {}
    for i in range(40):
        t = torch.tensor([amax * (1 - i / 100)])
        q = (x / (t / 7)).round().clamp(-8, 7) * (t / 7)
        errs[i] = float(((q - x).abs() ** 2.4).sum())
    want = amax * (1 - min(errs, key=errs.get) / 100)
    got = float(act_mse_threshold(x, spec))
    assert got == pytest.approx(want, rel=1e-6) and got < 0.9 * amax
    assert torch.equal(fake_quantize_act(x, spec, static_scale(torch.tensor([got]), spec)), fake_quantize_act(x, spec, static_scale(torch.tensor([want]), spec)))


def test_mse_observer_gives_smaller_static_scales_than_minmax(tiny_model_dir, corpus, tmp_path):
    from llmc_core import config
    from llmc_core.run import Run

    scales = {}
    for algo in ("minmax", "mse"):
        (tmp_path / algo).mkdir()
        act = {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True, "calib_algo": algo}
        cfg = _cfg(tmp_path / algo, tiny_model_dir, corpus, weight={"bit": 8, "symmetric": True, "granularity": "per_channel"}, act=act, eval_pos=("fake_quant",))
        run = Run(config.validate(cfg))
        run.execute()
        scales[algo] = run.act_scales
    assert scales["mse"].keys() == scales["minmax"].keys() and scales["mse"]
    assert all(float(scales["mse"][k]) <= float(scales["minmax"][k]) * (1 + 1e-6) for k in scales["mse"])
    assert any(float(scales["mse"][k]) < 0.99 * float(scales["minmax"][k]) for k in scales["mse"])


def test_mse_for_dynamic_activations_is_refused(tiny_model_dir, corpus, tmp_path):
    with pytest.raises(LlmcError) as exc:
        validate(_cfg(tmp_path, tiny_model_dir, corpus, weight={"bit": 8, "symmetric": True, "granularity": "per_channel"}, act={"bit": 8, "symmetric": True, "granularity": "per_token", "calib_algo": "mse"}))
    assert any(line.startswith("quant.act.calib_algo: mse") for line in exc.value.problems), exc.value.problems
