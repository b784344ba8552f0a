"""``QuantSpec``: what ``quant.weight`` describes (bits, symmetry, granularity, group size)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmc_core.schema import StrictModel


class QuantSpec(StrictModel):
    """Integer weight quantization settings (the ``quant.weight`` section).

    - ``bit``: 2 to 8.
    - ``symmetric``: symmetric (zero point 0, range ``[-2^(b-1), 2^(b-1)-1]``) or asymmetric
      (unsigned ``[0, 2^b-1]`` with an integer zero point).
    - ``granularity``: ``per_tensor``, ``per_channel`` (one scale per output row) or ``per_group``
      (one scale per ``group_size`` consecutive inputs of each row).
    - ``group_size``: required for ``per_group``; ``-1`` (no groups) is accepted with the others.
    - ``quant_type``: only ``int-quant`` (accepted for ModelTC/llmc configs).
    - ``scale_dtype``: ``float32`` (default) or ``float16``: round every scale to float16, as int4
      formats (AWQ GEMM) store them, so the fake-quantized model equals the exported one exactly.
    - ``calib_algo``: how a group's range is chosen when a method does not choose it itself
      (ModelTC/llmc's key). ``minmax`` (default): the group's min and max. ``mse``: the range
      shrunk by the factor in ``1, 0.99, ..., 0.21`` that minimises ``sum |w - q(w)|^2.4`` per
      group (the GPTQ reference's ``mse`` quantizer; 80 quantizations per weight, weight-only).
      Used by RTN, by GPTQ's group parameters and by AWQ's final rounding; AWQ's own scale and
      clip searches keep min-max inside the search.
    """

    bit: int = Field(ge=2, le=8)
    symmetric: bool = False
    granularity: Literal["per_tensor", "per_channel", "per_group"] = "per_group"
    group_size: int | None = Field(default=None, gt=0)
    quant_type: Literal["int-quant"] = "int-quant"
    scale_dtype: Literal["float32", "float16"] = "float32"
    calib_algo: Literal["minmax", "mse"] = "minmax"

    @model_validator(mode="before")
    @classmethod
    def _learnable_is_not_here(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("calib_algo") == "learnable":
            raise ValueError("calib_algo: learnable (OmniQuant-style learned clipping) is not implemented; use minmax or mse")
        return data

    @model_validator(mode="before")
    @classmethod
    def _minus_one_means_no_groups(cls, data: object) -> object:
        # ModelTC/llmc writes ``group_size: -1`` beside per_channel / per_tensor: no groups, as None
        if isinstance(data, dict) and type(data.get("group_size")) is int and data["group_size"] == -1 and data.get("granularity", "per_group") != "per_group":
            return {**data, "group_size": None}
        return data

    @model_validator(mode="after")
    def _group_size_matches_granularity(self) -> QuantSpec:
        if self.granularity == "per_group" and self.group_size is None:
            raise ValueError("granularity 'per_group' needs a group_size (e.g. 128, or 64 when 128 does not divide the hidden size)")
        if self.granularity != "per_group" and self.group_size not in (None, -1):
            raise ValueError(f"group_size is only used with granularity 'per_group' (got granularity '{self.granularity}')")
        return self

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bit - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bit - 1) - 1 if self.symmetric else 2**self.bit - 1

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.granularity == "per_group" else self.granularity
        mse = " mse" if self.calib_algo == "mse" else ""
        return f"w{self.bit} {g} {'sym' if self.symmetric else 'asym'}{mse}"
