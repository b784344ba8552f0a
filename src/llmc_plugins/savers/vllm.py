"""The ``vllm`` saver: the compressed-tensors checkpoint vLLM, SGLang and transformers load."""

from __future__ import annotations

from llmc_core.api import Saver
from llmc_core.errors import LlmcError


class SaveVllm(Saver):
    """The quantized model as a compressed-tensors checkpoint, served by vLLM and SGLang.

    Every scheme compressed-tensors can express, in the format it names for it (its own format
    inference and compressors do the writing): ``pack-quantized`` (W4A16 / W8A16 integers),
    ``int-quantized`` (INT8 W8A8, W4A8, W4AFP8), ``float-quantized`` (FP8 per-tensor, per-channel,
    per-block; dynamic or static activations), ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized``;
    static activation scales as ``input_scale`` (NVFP4: ``input_global_scale``), the KV cache as
    ``kv_cache_scheme`` with ``k_scale`` / ``v_scale`` per attention. Before schemes it wrote:

    Writes ``save_path/vllm_quant_model/``, which ``vllm serve save_path/vllm_quant_model`` runs:
    per quantized linear layer ``weight_packed`` / ``weight_scale`` / ``weight_shape`` (+
    ``weight_zero_point`` for asymmetric specs, + ``bias``), every other tensor as in the float
    model, tokenizer, generation config and chat template, and ``config.json`` with a
    compressed-tensors ``quantization_config`` whose ``ignore`` lists every linear layer left in
    float. Needs ``quant.weight.bit`` 4 or 8 and the ``compressed-tensors`` package
    (``pip install 'llmc[vllm]'``); any granularity (per-tensor is stored as equal per-channel
    scales). Only plain 2-D linear layers: MoE experts are refused. The packing is done by
    compressed-tensors itself (:mod:`llmc_plugins.savers.ct_format`). ``llmc export SAVE_PATH --to
    vllm`` writes the same folder later from a ``fake_quant_model``.
    """

    name = "vllm"
    folder = "vllm_quant_model"
    position = "fake_quant"

    @classmethod
    def accepts(cls, scheme):
        from llmc_plugins.savers.ct_format import ct_problems

        return [f"{p}. Save the fake-quantized model with save.save_fake instead, or change the scheme." for p in ct_problems(scheme)]

    def check(self, run_config):
        from llmc_plugins.savers.ct_format import missing_package

        missing = missing_package()
        if missing:
            raise LlmcError(f"save.save_vllm: {missing}.")

    def save(self, state, folder):
        from llmc_plugins.savers.ct_format import write_ct_folder

        write_ct_folder(state.model, state.quantized, folder, state.tokenizer, scheme=getattr(state, "scheme", None), act_scales=getattr(state, "act_scales", None), kv_scales=getattr(state, "kv_scales", None))
