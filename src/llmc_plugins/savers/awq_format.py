"""AWQ checkpoint folders: write a quantized model in the AutoAWQ GEMM format, read one back.

A folder is a Hugging Face model folder whose quantized linear layers are stored as
``<name>.qweight`` / ``<name>.qzeros`` / ``<name>.scales`` (+ ``<name>.bias``) in the layout of
:mod:`llmc_core.quant.pack`, every other tensor as in the float model, and whose ``config.json``
carries ``quantization_config = {quant_method: "awq", bits: 4, group_size, zero_point: true,
version: "gemm", modules_to_not_convert}`` (what vLLM, SGLang and transformers read).

:func:`load_awq_folder` reads such a folder into a transformers model with
:class:`~llmc_core.quant.qlinear.QuantLinear` layers, without autoawq or gptqmodel.

Which specs the layout holds (:func:`~llmc_core.quant.rules.awq_problems`) and the
``quantization_config`` entry live in :mod:`llmc_core.quant.rules`, below the packing code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmc_core.errors import LlmcError
from llmc_core.quant.rules import awq_problems
from llmc_core.quant.rules import awq_quantization_config as quantization_config

log = logging.getLogger("llmc")

QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales")


def unquantized_linears(model: Any, quantized: Mapping[str, Any]) -> list[str]:
    """Names of the model's ``nn.Linear`` layers that stay in float (e.g. ``lm_head``)."""
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]


def write_awq_folder(model: Any, quantized: Mapping[str, Any], folder: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    """Save ``model`` with the layers in ``quantized`` (full name -> ``QuantizedWeight``) packed.

    ``model`` is left as it was. Returns the ``quantization_config`` written to ``config.json``.
    """
    from llmc_core.quant.qlinear import quant_linears

    if not quantized:
        raise LlmcError("save.save_awq: nothing was quantized (the quant method returned no integer weights), so there is no AWQ model to write.")
    specs = {(q.spec.bit, q.spec.granularity, q.spec.group_size) for q in quantized.values()}
    if len(specs) > 1:
        raise LlmcError(f"save.save_awq: the AWQ format holds one bit width and group size per model, but the layers were quantized with {len(specs)} settings. Use save_fake instead.")
    bit, granularity, group_size = specs.pop()
    problems = awq_problems(bit, granularity, group_size)
    if problems:
        raise LlmcError(*(f"save.save_awq: {p}. Use save.save_fake instead." for p in problems))
    _warn_if_scales_round(quantized)
    folder = Path(folder)
    qcfg = quantization_config(group_size, unquantized_linears(model, quantized))
    with quant_linears(model, quantized):
        model.save_pretrained(folder, safe_serialization=True)
    cfg_path = folder / "config.json"
    data = json.loads(cfg_path.read_text(encoding="utf-8"))
    data["quantization_config"] = qcfg
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return qcfg


def _warn_if_scales_round(quantized: Mapping[str, Any]) -> None:
    worst = 0.0
    for q in quantized.values():
        if getattr(q.spec, "scale_dtype", "float32") != "float16":
            s = q.scales.float()
            worst = max(worst, ((s.half().float() - s).abs() / s.abs().clamp(min=1e-30)).max().item())
    if worst > 0:
        log.warning(
            "save_awq: scales are stored as float16, which moves them by up to %.2g (relative) from the fake-quantized "
            "model's float32 scales; set quant.weight.scale_dtype: float16 to make both models identical.",
            worst,
        )


def read_quantization_config(folder: str | Path) -> dict[str, Any]:
    """The folder's ``quantization_config``, checked to be AWQ GEMM 4-bit with zero points."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise LlmcError(f"{folder}: no config.json; give the awq_model folder llmc wrote (save.save_awq).")
    qcfg = json.loads(cfg_path.read_text(encoding="utf-8")).get("quantization_config") or {}
    version = str(qcfg.get("version", qcfg.get("format", "gemm"))).lower()
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    if qcfg.get("quant_method") != "awq" or version != "gemm" or bits != 4 or qcfg.get("zero_point") is False:
        raise LlmcError(f"{folder}: config.json's quantization_config is not AWQ GEMM 4-bit with zero points ({qcfg or 'missing'}); only that layout can be loaded.")
    return qcfg


def read_safetensors(folder: str | Path) -> dict[str, Any]:
    """Every tensor of a (possibly sharded) safetensors checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(folder / f)))
    return state


def load_awq_folder(folder: str | Path, device: Any = "cpu", dtype: Any = None) -> Any:
    """A causal-LM model from an AWQ GEMM folder, its quantized layers as ``QuantLinear``.

    ``dtype`` (default: the folder's ``torch_dtype``) applies to the float tensors; the tokenizer
    loads as usual with ``AutoTokenizer`` (``from_pretrained(folder, trust_remote_code=False)``).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmc_core.quant.qlinear import QuantLinear, _parent

    qcfg = read_quantization_config(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # llmc's own format: no code of the folder's
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built as a float model, then the packed layers go in
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = read_safetensors(folder)
    for name in sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight")):
        linear = model.get_submodule(name)
        k, n = state[f"{name}.qweight"].shape[0], state[f"{name}.scales"].shape[1]
        if (k, n) != (linear.in_features, linear.out_features):
            raise LlmcError(f"{folder}: {name} is stored as {k}x{n} but the model config makes it {linear.in_features}x{linear.out_features}.")
        parent, child = _parent(model, name)
        setattr(parent, child, QuantLinear(k, n, qcfg["group_size"], linear.bias is not None, linear.weight.dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k not in missing}
    missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]  # tied weights are fine
    if missing or unexpected:
        raise LlmcError(f"{folder}: the checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    return model.to(device).eval()


def _no_init() -> Any:
    """transformers' ``no_init_weights`` (skip random init: every tensor is loaded afterwards)."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()
