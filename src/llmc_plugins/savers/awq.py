"""The ``awq`` saver: the real int4 model in the AutoAWQ GEMM format (``save.save_awq: true``)."""

from __future__ import annotations

from llmc_core.api import Saver


class SaveAwq(Saver):
    """The real int4 model in the AutoAWQ "GEMM" format, which vLLM, SGLang and transformers load.

    Writes ``save_path/awq_model/``: per quantized linear layer ``qweight`` / ``qzeros`` /
    ``scales`` (+ ``bias``), every other tensor as in the float model, the tokenizer, and
    ``config.json`` with an AWQ ``quantization_config``. Needs ``quant.weight`` to be 4-bit
    per-group (symmetric specs are stored with zero point 8). With ``quant.weight.scale_dtype:
    float16`` the folder dequantizes to exactly the ``save_fake`` weights; with float32 scales
    the export rounds them to float16 (a warning gives the size). llmc reads the folder back
    with ``llmc_plugins.savers.awq_format.load_awq_folder``.
    """

    name = "awq"
    folder = "awq_model"
    position = "fake_quant"

    @classmethod
    def accepts(cls, scheme):
        from llmc_core.quant.rules import awq_problems

        w = scheme.weight
        if not scheme.weight_only or w.is_float:
            return [f"the AWQ GEMM format stores 4-bit integer weights only (W4A16), not {scheme.describe()}. Save it with save_vllm (compressed-tensors) or save_fake instead."]
        from llmc_core.quant.rules import gguf_grid_problems

        return [f"{p}." for p in gguf_grid_problems(w)] + [f"{p}. Save the fake-quantized model with save.save_fake instead, or change quant.weight." for p in awq_problems(w.bit, w.granularity, w.group_size)]

    def check_model(self, adapter):
        from llmc_core.errors import LlmcError
        from llmc_core.weights import int4_layer_problem

        problem = int4_layer_problem(adapter, "save.save_awq")
        if problem:
            raise LlmcError(problem)

    def save(self, state, folder):
        from llmc_plugins.savers.awq_format import write_awq_folder

        write_awq_folder(state.model, state.quantized, folder, state.tokenizer)
