"""RTN: round-to-nearest weight quantization, the baseline every method is measured against."""

from __future__ import annotations

from llmc_core import hookimpl
from llmc_core.api import Method, NoOptions


class Rtn(Method):
    """Round-to-nearest (RTN) weight-only quantization.

    What it does: replaces every linear layer inside the decoder blocks by its quantize-dequantize
    value under ``quant.weight`` (any scheme: 2-8 bit integers, symmetric or asymmetric, per-tensor,
    per-channel or per-group; FP8 per-tensor, per-channel or per-block; NVFP4 / MXFP4), with each
    group's scale from its min/max (asymmetric) or absmax (symmetric). Activation and KV cache
    quantization (``quant.act``, ``quant.kvcache``) are the runner's; static activation scales
    make the run calibrate (one block pass over the calibration data, observing inputs).
    What it does not do: touch embeddings or ``lm_head``, use calibration data for the weights, or
    transform the float model (so ``transformed`` equals ``pretrain``).

    Example::

        quant:
          method: RTN
          weight: {bit: 4, symmetric: false, granularity: per_group, group_size: 64}
          special: {}

    ``quant.special`` takes no options.
    """

    name = "rtn"
    Config = NoOptions
    needs_calibration = False

    @classmethod
    def accepts(cls, scheme):
        return []  # every scheme: the rounding is llmc_core.quant's, activations are the runner's

    @classmethod
    def transform_problems(cls, options):
        return ["RTN only rounds the weights, it transforms nothing; put it last in quant.method (the quantizer), or leave it out"]


@hookimpl
def llmc_register_methods(register):
    register(Rtn)
