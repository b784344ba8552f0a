"""Built-in savers: the transformed float model and the fake-quantized model as HF folders."""

from __future__ import annotations

import json
from pathlib import Path

from llmc_core import hookimpl
from llmc_core.api import Saver


def save_hf_folder(state, folder: str) -> None:
    """``save_pretrained`` of ``state``'s model and tokenizer (safetensors), loadable by ``from_pretrained``."""
    state.model.save_pretrained(folder, safe_serialization=True)
    if state.tokenizer is not None:
        state.tokenizer.save_pretrained(folder)


class SaveTrans(Saver):
    """The transformed float model (after the method's equivalent transforms, before quantization)."""

    name = "trans"
    folder = "transformed_model"
    position = "transformed"

    def save(self, state, folder):
        save_hf_folder(state, folder)


class SaveFake(Saver):
    """The fake-quantized model: quantized-then-dequantized weights in the model's float dtype.

    Stores every scheme: with activation or KV cache quantization, ``llmc_quant.json`` keeps the
    whole scheme and ``llmc_qparams.safetensors`` the static scales (``<layer>.input_scale``,
    ``<attention>.k_scale`` / ``v_scale``); the folder's weights alone are the float model with
    quantized weights (an engine applies the activation scheme from the exported formats).

    Beside the weights: ``llmc_quant.json`` (method, spec, quantized layers) and
    ``llmc_qparams.safetensors`` (scales, zero points), from which ``llmc export`` writes the
    real-int formats later without calibrating again (:mod:`llmc_core.quant.stored`).
    """

    name = "fake"
    folder = "fake_quant_model"
    position = "fake_quant"
    keeps_qparams = True  # llmc export reads this folder

    @classmethod
    def accepts(cls, scheme):
        return []  # any scheme: its specs and static scales are kept beside the weights

    def save(self, state, folder):
        from llmc_core.quant.stored import INFO_FILE, write_qparams

        save_hf_folder(state, folder)
        spec = state.config.weight.model_dump()
        info = {"method": state.config.quant.method, "weight": spec, "quantized_layers": sorted(state.quantized)}
        scheme = getattr(state, "scheme", None)
        if scheme is not None and not scheme.weight_only:  # activations and KV cache, with their static scales
            info["scheme"] = {**scheme.as_dict(), "preset": scheme.preset}
        other = {n: q.spec.model_dump() for n, q in state.quantized.items() if q.spec.model_dump() != spec}
        if other:  # a method that quantized some layers with their own spec
            info["layer_weight"] = other
        if state.quantized:
            info.update(write_qparams(folder, state.model, state.quantized, getattr(state, "act_scales", None), getattr(state, "kv_scales", None)))
        (Path(folder) / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


@hookimpl
def llmc_register_savers(register):
    from llmc_plugins.savers.awq import SaveAwq
    from llmc_plugins.savers.gguf import SaveGguf
    from llmc_plugins.savers.vllm import SaveVllm

    register(SaveTrans)
    register(SaveFake)
    register(SaveAwq)
    register(SaveVllm)
    register(SaveGguf)
