"""The ``vllm`` saver: the compressed-tensors checkpoint vLLM, SGLang and transformers load."""

from __future__ import annotations

from llmc_core.api import Saver
from llmc_core.errors import LlmcError


class SaveVllm(Saver):
    """Real int4/int8 weights in the compressed-tensors pack-quantized format, served by vLLM and SGLang.

    Writes ``save_path/vllm_quant_model/``, which ``vllm serve save_path/vllm_quant_model`` runs:
    per quantized linear layer ``weight_packed`` / ``weight_scale`` / ``weight_shape`` (+
    ``weight_zero_point`` for asymmetric specs, + ``bias``), every other tensor as in the float
    model, tokenizer, generation config and chat template, and ``config.json`` with a
    compressed-tensors ``quantization_config`` whose ``ignore`` lists every linear layer left in
    float. Needs ``quant.weight.bit`` 4 or 8 and the ``compressed-tensors`` package
    (``pip install 'llmc[vllm]'``); any granularity (per-tensor is stored as equal per-channel
    scales). Only plain 2-D linear layers: MoE experts are refused. The packing is done by
    compressed-tensors itself (:mod:`llmc_core.quant.ct_format`). ``llmc export SAVE_PATH --to
    vllm`` writes the same folder later from a ``fake_quant_model``.
    """

    name = "vllm"
    folder = "vllm_quant_model"
    position = "fake_quant"

    def check(self, run_config):
        from llmc_core.quant.ct_format import ct_problems, missing_package

        problems = []
        missing = missing_package()
        if missing:
            problems.append(f"save.save_vllm: {missing}.")
        spec = run_config.weight
        if spec is not None:
            problems += [f"save.save_vllm: {p}. Save the fake-quantized model with save.save_fake instead, or change quant.weight." for p in ct_problems(spec.bit, spec.granularity, spec.group_size)]
        if problems:
            raise LlmcError(*problems)

    def save(self, state, folder):
        from llmc_core.quant.ct_format import write_ct_folder

        write_ct_folder(state.model, state.quantized, folder, state.tokenizer)
