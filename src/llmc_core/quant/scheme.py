"""``Scheme``: what a run quantizes (weights, input activations, KV cache), as data.

The config's ``quant.weight``, ``quant.act`` and ``quant.kvcache`` (ModelTC/llmc's keys) and the
``quant.scheme`` shorthand (compressed-tensors' preset names: ``FP8_DYNAMIC``, ``W8A8``,
``NVFP4``, ...) become one validated :class:`Scheme`, which flows from the config through the
methods, the evaluations (activation quantizers live from ``fake_quant`` on) and into every
saver (each saver says which schemes it :meth:`~llmc_core.api.Saver.accepts`). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmc_core.quant.spec import KvSpec, QuantSpec

_INT_W = {"bit": None, "symmetric": True, "granularity": "per_group", "group_size": 128}
_TOKEN = {"symmetric": True, "granularity": "per_token"}
_FP8 = {"quant_type": "float-quant", "bit": "e4m3", "symmetric": True}
_NVFP4 = {"quant_type": "float-quant", "bit": "e2m1", "symmetric": True, "granularity": "per_group", "group_size": 16, "scale_dtype": "e4m3"}
_MXFP4 = {**_NVFP4, "group_size": 32, "scale_dtype": "e8m0"}


def _int_wnam(w: int, a: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"weight": {**_INT_W, "bit": w}}
    if a is not None:
        out["act"] = {"bit": a, **_TOKEN}
    return out


# compressed-tensors 0.20's PRESET_SCHEMES in llmc's (ModelTC's) keys; tests/test_scheme.py
# compares every entry with the package's own table. MXFP6/MXFP8 are not here: llmc has no
# e3m2/e2m3 elements and no e8m0 scales on FP8 elements yet.
PRESETS: dict[str, dict[str, Any]] = {
    "W4A16_ASYM": {"weight": {**_INT_W, "bit": 4, "symmetric": False}},
    "W8A8": {"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"}, "act": {"bit": 8, **_TOKEN}},
    "W4AFP8": {"weight": {**_INT_W, "bit": 4}, "act": {**_FP8, "granularity": "per_token"}},
    "FP8": {"weight": {**_FP8, "granularity": "per_tensor"}, "act": {**_FP8, "granularity": "per_tensor", "static": True}},
    "FP8_DYNAMIC": {"weight": {**_FP8, "granularity": "per_channel"}, "act": {**_FP8, "granularity": "per_token"}},
    "FP8_BLOCK": {"weight": {**_FP8, "granularity": "per_block", "block_size": [128, 128]}, "act": {**_FP8, "granularity": "per_group", "group_size": 128}},
    "NVFP4A16": {"weight": dict(_NVFP4)},
    "NVFP4": {"weight": dict(_NVFP4), "act": {**_NVFP4, "static": True}},
    "MXFP4A16": {"weight": dict(_MXFP4)},
    "MXFP4": {"weight": dict(_MXFP4), "act": dict(_MXFP4)},
    "MXFP4XFP8": {"weight": dict(_MXFP4), "act": {**_FP8, "granularity": "per_group", "group_size": 128}},
}
PRESETS["INT8"] = PRESETS["W8A8"]
for _w, _a in ((2, 4), (2, 8), (3, 4), (3, 8), (4, 4), (4, 8), (5, 8), (6, 8), (7, 8)):
    PRESETS[f"W{_w}A{_a}"] = _int_wnam(_w, _a)
for _w in range(2, 9):
    PRESETS[f"W{_w}A16"] = _int_wnam(_w)

SECTION_OF = {"weight": "quant.weight", "act": "quant.act", "kvcache": "quant.kvcache"}


@dataclass(frozen=True)
class Scheme:
    """The validated scheme of a run: ``weight`` always; ``act`` (input activations of every
    quantized linear layer) and ``kv`` (keys and values) when the config quantizes them;
    ``preset``: the ``quant.scheme`` name it came from, if any."""

    weight: QuantSpec
    act: QuantSpec | None = None
    kv: KvSpec | None = None
    preset: str | None = None

    @property
    def weight_only(self) -> bool:
        return self.act is None and self.kv is None

    @property
    def integer_weight_only(self) -> bool:
        """What every llmc method and saver handled before schemes: integer weights, nothing else."""
        return self.weight_only and not self.weight.is_float

    @property
    def needs_calibration(self) -> bool:
        """Static activation or KV scales are calibrated in the block pass."""
        return bool((self.act is not None and self.act.static) or (self.kv is not None and self.kv.static))

    def describe(self) -> str:
        parts = [self.weight.describe("w")]
        if self.act is not None:
            parts.append(self.act.describe("a"))
        if self.kv is not None:
            parts.append(self.kv.describe("kv"))
        head = f"{self.preset}: " if self.preset else ""
        return head + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """The expanded sections, as ``llmc validate`` prints them and ``llmc_quant.json`` keeps them."""
        out: dict[str, Any] = {"weight": self.weight.model_dump()}
        if self.act is not None:
            out["act"] = self.act.model_dump()
        if self.kv is not None:
            out["kvcache"] = self.kv.model_dump()
        return out


def expand_preset(name: Any, weight: Any, act: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """``(weight, act, problems)``: the preset's sections with the explicit keys of ``weight`` and
    ``act`` laid over them; every explicit key that contradicts the preset is a problem."""
    key = str(name).upper()
    if key not in PRESETS:
        from llmc_core.errors import did_you_mean

        return None, None, [f"quant.scheme: unknown scheme '{name}'.{did_you_mean(key, sorted(PRESETS))} Available: {', '.join(sorted(PRESETS))}."]
    preset = PRESETS[key]
    problems: list[str] = []
    out: list[dict[str, Any] | None] = []
    for part, given in (("weight", weight), ("act", act)):
        base = preset.get(part)
        if given is not None and not isinstance(given, dict):
            problems.append(f"{SECTION_OF[part]}: expected a mapping of keys, got {type(given).__name__}.")
            given = None
        if base is None:
            if given:
                problems.append(f"{SECTION_OF[part]}: quant.scheme {key} does not quantize {'activations' if part == 'act' else 'weights'}; remove {SECTION_OF[part]} or choose another scheme.")
            out.append(None)
            continue
        merged = dict(base)
        for k, v in (given or {}).items():
            if k in base and _norm(base[k]) != _norm(v):
                problems.append(f"{SECTION_OF[part]}.{k}: {v!r} contradicts quant.scheme {key} ({k}: {base[k]!r}); remove the key, or describe the scheme with quant.weight/quant.act alone.")
            merged[k] = v if k not in base else base[k]
        out.append(merged)
    return out[0], out[1], problems


def _norm(v: Any) -> Any:
    return v.lower() if isinstance(v, str) else v


def scheme_problems(scheme: Scheme) -> list[str]:
    """Combinations no format has, refused at validation (one line each)."""
    out = []
    w, a = scheme.weight, scheme.act
    if w.granularity == "per_token":
        out.append("quant.weight.granularity: per_token is for activations (one scale per token at run time); use per_channel for weights.")
    if w.static:
        out.append("quant.weight.static: weights are always quantized ahead of time; static is an activation setting (quant.act.static).")
    if a is not None:
        if a.granularity in ("per_block", "per_channel"):
            out.append(f"quant.act.granularity: {a.granularity} is a weight layout; activations take per_token, per_tensor (static or dynamic) or per_group.")
        if a.calib_algo == "mse" and (not a.static or a.fp4_kind == "nvfp4"):
            out.append("quant.act.calib_algo: mse chooses a static per-tensor activation scale (static: true, not NVFP4's global scale); remove calib_algo or set static: true.")
        if a.static and not a.symmetric:
            out.append("quant.act: static activation scales are symmetric (the format stores no activation zero point); set symmetric: true.")
        if a.scale_dtype == "e4m3" and a.bit == "e2m1" and not a.static:
            out.append("quant.act: NVFP4 activations need a calibrated global scale; set static: true (the group scales stay dynamic).")
        if a.is_float and a.bit == "e2m1" and a.fp4_kind is None:
            out.append("quant.act: FP4 activations need group scales: scale_dtype e4m3 with group_size 16 (NVFP4) or e8m0 with group_size 32 (MXFP4).")
    return out
