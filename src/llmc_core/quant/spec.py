"""``QuantSpec``: one tensor's quantization (``quant.weight``, ``quant.act``, ``quant.kvcache``).

The field names are ModelTC/llmc's, so its configs validate unchanged; each maps one to one onto
compressed-tensors' ``QuantizationArgs`` (``describe_ct`` in :mod:`llmc_core.quant.scheme`), the
format llmc exports to. Torch-free: config validation never imports torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationInfo, field_validator, model_validator

from llmc_core.schema import StrictModel

FLOAT_BITS = ("e4m3", "e5m2", "e2m1")  # OCP FP8 E4M3FN and E5M2, FP4 E2M1
FLOAT_MAX = {"e4m3": 448.0, "e5m2": 57344.0, "e2m1": 6.0}
Granularity = Literal["per_tensor", "per_channel", "per_group", "per_block", "per_token"]


class QuantSpec(StrictModel):
    """How one kind of tensor is quantized (the ``quant.weight`` / ``quant.act`` section).

    - ``quant_type``: ``int-quant`` (default) or ``float-quant``.
    - ``bit``: 2 to 8 for ``int-quant``; ``e4m3``, ``e5m2`` (FP8) or ``e2m1`` (FP4) for
      ``float-quant`` (``bit: 8`` / ``bit: 4`` with ``float-quant`` mean ``e4m3`` / ``e2m1``; a
      float name alone implies ``float-quant``).
    - ``symmetric``: zero point 0 (int range ``[-2^(b-1), 2^(b-1)-1]``), or asymmetric (unsigned
      ``[0, 2^b-1]`` with an integer zero point). Float formats are symmetric.
    - ``granularity``: ``per_tensor``, ``per_channel`` (one scale per output row), ``per_group``
      (one scale per ``group_size`` consecutive inputs), ``per_block`` (weights: one scale per
      ``block_size`` ``[rows, cols]`` tile, e.g. ``[128, 128]``; ModelTC's ``block_size: 128``
      means ``[128, 128]``) or ``per_token`` (activations: one scale per token, computed at run time).
    - ``group_size``: required for ``per_group`` (-1 with ``per_channel`` is accepted, as ModelTC writes it).
    - ``scale_dtype``: how scales are stored: ``float32`` (default), ``float16`` (rounded to
      float16 before the codes are computed, as AWQ GEMM stores them, so fake == exported bit for
      bit), ``e4m3`` (FP4 only: NVFP4's FP8 group scales under one float32 global scale per tensor;
      the default for ``e2m1`` with group size 16) or ``e8m0`` (FP4 only: the OCP MX power-of-two
      scales; the default for ``e2m1`` with group size 32).
    - ``zero_dtype``: how an asymmetric spec's zero point is held: ``int`` (default: an integer
      code, ``w = (q - zero) * scale``, as compressed-tensors and AWQ store it) or ``float16``: the
      group's min itself, rounded to float16, ``w = q * scale + m``, as a GGUF Q4_1 / Q5_1 block
      stores it (any float16 min, not only a multiple of the scale). Needs ``scale_dtype:
      float16``; ``save_gguf`` sets both for asymmetric specs.
    - ``signed_scale`` (symmetric integer specs): each group's scale takes the sign that puts its
      largest-magnitude weight on the code range's longer end, ``-2^(b-1)`` (scale ``= peak /
      -2^(b-1)``, negative when the peak is positive), as GGUF's Q4_0 / Q5_0 / Q8_0 store it: one
      more usable level than ``max|w| / (2^(b-1) - 1)`` (27% less squared weight error at 4 bits on
      SmolLM2). Only formats that store a signed scale take it; ``save_gguf`` sets it.
    - ``static`` (activations): one per-tensor scale calibrated on the calibration data in the
      block pass, instead of scales computed from each input at run time. With NVFP4 activations
      (``e2m1``, ``scale_dtype: e4m3``) the global scale is static and the group scales dynamic.
    - ``calib_algo``: how a weight group's range is chosen when a method does not choose it
      (``minmax``: the group's min and max; ``mse``: the range shrunk by the factor in ``1, 0.99,
      ..., 0.21`` that minimises ``sum |w - q(w)|^2.4``). Static activation scales come from the
      largest ``|x|`` seen on the calibration data (``minmax``) or, with ``mse``, from the clipping
      threshold that minimises ``sum |x - q(x)|^2.4`` on each observed input, averaged over the
      calibration tokens (llm-compressor's MSE observer does the same per batch).
    - ``use_qtorch`` (ModelTC's key): accepted; llmc computes float formats with torch's own
      float8 types and an exact FP4 rounding, so it changes nothing.
    """

    quant_type: Literal["int-quant", "float-quant"] = "int-quant"  # first: ``bit`` is read against it
    bit: int | str
    symmetric: bool = False
    granularity: Granularity = "per_group"
    group_size: int | None = None
    block_size: list[int] | None = None
    scale_dtype: Literal["float32", "float16", "e4m3", "e8m0"] = "float32"
    zero_dtype: Literal["int", "float16"] = "int"
    signed_scale: bool = False
    calib_algo: Literal["minmax", "mse"] = "minmax"
    static: bool = False
    use_qtorch: bool = False

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if str(data.get("bit")) == "48":
            raise ValueError("bit: 48 is ModelTC's two-level weight format (int8 per channel, then int4 per group with 8-bit scales) for its W4A8 kernels, which llmc does not implement; use quant.scheme: W4A8 (int4 per-group weights, int8 per-token activations) or W4AFP8")
        if data.get("calib_algo") == "learnable":
            raise ValueError("calib_algo: learnable (OmniQuant-style learned clipping) is not implemented; use minmax or mse")
        bit = data.get("bit")
        if isinstance(bit, str) and bit.lower() in FLOAT_BITS:
            data["bit"] = bit.lower()
            data.setdefault("quant_type", "float-quant")
        if data.get("quant_type") == "float-quant":
            if data.get("bit") in (8, 4):
                data["bit"] = {8: "e4m3", 4: "e2m1"}[data["bit"]]
            data.setdefault("symmetric", True)
            if data.get("bit") == "e2m1" and "scale_dtype" not in data:
                data["scale_dtype"] = {16: "e4m3", 32: "e8m0"}.get(data.get("group_size"), "float32")
        if isinstance(data.get("block_size"), int) and not isinstance(data.get("block_size"), bool):
            data["block_size"] = [data["block_size"], data["block_size"]]
        return data

    @field_validator("bit")
    @classmethod
    def _bit_fits_type(cls, v: int | str, info: ValidationInfo) -> int | str:
        if info.data.get("quant_type", "int-quant") == "int-quant":
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise ValueError("int-quant takes 2 to 8 bits; for float formats set quant_type: float-quant and bit: e4m3, e5m2 or e2m1")
        elif v not in FLOAT_BITS:
            raise ValueError("float-quant takes e4m3, e5m2 (FP8) or e2m1 (FP4)")
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size_positive(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v <= 0:
            raise ValueError("should be a positive number of input columns (or -1 with per_channel)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> QuantSpec:
        if self.quant_type == "int-quant":
            if self.scale_dtype in ("e4m3", "e8m0"):
                raise ValueError(f"scale_dtype: {self.scale_dtype} scales belong to FP4 (quant_type: float-quant, bit: e2m1)")
        else:
            if not self.symmetric:
                raise ValueError("symmetric: float formats are symmetric (zero point 0); set symmetric: true")
            if self.scale_dtype in ("e4m3", "e8m0"):
                if self.bit != "e2m1" or self.granularity != "per_group":
                    raise ValueError(f"scale_dtype: {self.scale_dtype} is FP4's group scale (bit: e2m1, granularity: per_group)")
            elif self.scale_dtype == "float16":
                raise ValueError("scale_dtype: float16 is for integer formats (AWQ GEMM); float formats keep float32 scales")
        if self.zero_dtype == "float16" and (self.is_float or self.symmetric or self.scale_dtype != "float16"):
            raise ValueError("zero_dtype: float16 (GGUF's float16 min) is for asymmetric integer specs with scale_dtype: float16")
        if self.signed_scale and (self.is_float or not self.symmetric):
            raise ValueError("signed_scale: true is for symmetric integer specs (GGUF's Q4_0 / Q5_0 / Q8_0 grid)")
        if self.granularity == "per_group" and self.group_size in (None, -1):
            raise ValueError("granularity 'per_group' needs a group_size (e.g. 128, or 64 when 128 does not divide the hidden size)")
        if self.granularity not in ("per_group",) and self.group_size not in (None, -1):
            raise ValueError(f"group_size is only used with granularity 'per_group' (got granularity '{self.granularity}')")
        if self.granularity == "per_block":
            if not self.block_size or len(self.block_size) != 2 or min(self.block_size) <= 0:
                raise ValueError("granularity 'per_block' needs block_size: [rows, cols] (e.g. [128, 128]) or one number for square blocks")
        elif self.block_size is not None:
            raise ValueError(f"block_size is only used with granularity 'per_block' (got granularity '{self.granularity}')")
        if self.static and self.granularity not in ("per_tensor",) and self.scale_dtype != "e4m3":
            raise ValueError(f"static: true calibrates one scale per tensor; use granularity: per_tensor (got {self.granularity})")
        return self

    # -- derived ---------------------------------------------------------------------------

    @property
    def is_float(self) -> bool:
        return self.quant_type == "float-quant"

    @property
    def num_bits(self) -> int:
        """Bits per element (8 for FP8, 4 for FP4)."""
        return {"e4m3": 8, "e5m2": 8, "e2m1": 4}[self.bit] if self.is_float else int(self.bit)

    @property
    def qmin(self) -> int | float:
        if self.is_float:
            return -FLOAT_MAX[self.bit]
        return -(2 ** (self.bit - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int | float:
        if self.is_float:
            return FLOAT_MAX[self.bit]
        return 2 ** (self.bit - 1) - 1 if self.symmetric else 2**self.bit - 1

    @property
    def fp4_kind(self) -> str | None:
        """``nvfp4`` (e4m3 group scales + global scale), ``mxfp4`` (e8m0 scales) or None."""
        return {"e4m3": "nvfp4", "e8m0": "mxfp4"}.get(self.scale_dtype) if self.bit == "e2m1" else None

    def describe(self, role: str = "w") -> str:
        """Short form for logs and reports, e.g. ``w4 g64 asym``, ``w:fp8-e4m3 per_channel``, ``a:nvfp4 g16``."""
        g = f"g{self.group_size}" if self.granularity == "per_group" else "b{}x{}".format(*self.block_size) if self.block_size else self.granularity
        static = " static" if self.static else ""
        if self.is_float:
            name = self.fp4_kind or ("fp4" if self.bit == "e2m1" else f"fp8-{self.bit}")
            return f"{role}:{name} {g}{static}"
        mse = " mse" if self.calib_algo == "mse" else ""
        return f"{role}{self.bit} {g} {'sym' if self.symmetric else 'asym'}{mse}{static}"


class KvSpec(QuantSpec):
    """``quant.kvcache``: keys and values quantized as they enter the attention (after RoPE).
    ModelTC's keys plus ``method: Naive`` (the only method: round to nearest). ``per_tensor``
    scales are static (calibrated), one for K and one for V per attention layer, as vLLM's
    ``k_scale``/``v_scale``; ``per_token`` scales are dynamic."""

    method: Literal["naive", "Naive"] = "naive"

    @model_validator(mode="after")
    def _kv_rules(self) -> KvSpec:
        if self.granularity not in ("per_tensor", "per_token"):
            raise ValueError(f"granularity: the KV cache is quantized per_tensor (static) or per_token (dynamic), got {self.granularity}")
        if self.granularity == "per_tensor" and not self.static:
            object.__setattr__(self, "static", True)
        return self
