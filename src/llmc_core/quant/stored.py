"""The quantization parameters ``save_fake`` keeps beside the weights, and reading them back.

A ``fake_quant_model`` folder holds the dequantized weights; with ``llmc_qparams.safetensors``
beside them (``<layer>.scales`` float32, ``<layer>.zeros`` uint8 for asymmetric specs,
``<layer>.g_idx`` int32 when a method set one) and the spec in ``llmc_quant.json``, the integer
codes follow again as ``round(W / scale) + zero``: that is what lets ``llmc export`` write real
int4/int8 formats later without calibrating again. float32, float16 and bfloat16 weights give
codes of up to 8 bits back (bfloat16's relative rounding 2^-9 times ``|q - zero| <= 255`` stays
under 1/2), except where a float16 weight is subnormal; where any layer's codes do not come back,
``<layer>.codes`` is stored too (decided by trying, at save time). Everything read back is checked: the codes must dequantize to
exactly the stored weights, or the folder is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmc_core.errors import LlmcError, damaged_file_errors, first_line

QPARAMS_FILE = "llmc_qparams.safetensors"
INFO_FILE = "llmc_quant.json"


def _column_params(qw: Any, g_idx: Any, device: Any) -> tuple[Any, Any]:
    """Scale and zero point per weight element's column: ``[out, in]`` each (float32, on ``device``)."""
    import torch

    out_f, in_f = qw.codes.shape
    rows = qw.scales.shape[0]
    scales, zeros = qw.scales.to(device).float().reshape(rows, -1), qw.zeros.to(device).float().reshape(rows, -1)
    if qw.spec.granularity == "per_block":
        r, c = qw.spec.block_size
        return tuple(t.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1) for t in (scales, zeros))
    if rows != out_f:  # per tensor
        return scales.expand(out_f, in_f), zeros.expand(out_f, in_f)
    if g_idx is None:
        g_idx = torch.arange(in_f, device=scales.device) * scales.shape[1] // in_f
    g_idx = g_idx.long().to(scales.device)
    return scales[:, g_idx], zeros[:, g_idx]


def recover_codes(weight: Any, qw: Any) -> Any:
    """The integer codes of a fake-quantized ``weight`` given ``qw``'s scales, zeros and spec."""
    import torch

    from llmc_core.quant.fake import codes_dtype

    spec = qw.spec
    scales, zeros = _column_params(qw, getattr(qw, "g_idx", None), weight.device)
    if spec.is_float:
        from llmc_core.quant.floats import float_round

        return float_round(weight.float() / scales, spec.bit).to(codes_dtype(spec))
    if getattr(spec, "zero_dtype", "int") == "float16":  # zeros hold the float16 min: w = q * scale + m
        q = torch.clamp(torch.round((weight.float() - zeros) / scales), spec.qmin, spec.qmax)
    else:
        q = torch.clamp(torch.round(weight.float() / scales) + zeros, spec.qmin, spec.qmax)
    return q.to(codes_dtype(spec))


def write_qparams(folder: str | Path, model: Any, quantized: Mapping[str, Any], act_scales: Mapping[str, Any] | None = None, kv_scales: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``llmc_qparams.safetensors`` for ``model``'s quantized layers (and the static
    activation / KV cache scales); return what ``llmc_quant.json`` should say about it."""
    import torch
    from safetensors.torch import save_file

    from llmc_core.layer_ops import weight_of

    tensors: dict[str, Any] = {}
    need_codes = []
    for name, qw in quantized.items():
        tensors[f"{name}.scales"] = qw.scales.detach().float().cpu().contiguous()
        if getattr(qw.spec, "zero_dtype", "int") == "float16":  # float16 mins, kept as they are
            tensors[f"{name}.zeros"] = qw.zeros.detach().float().cpu().contiguous()
        elif not qw.spec.symmetric:
            tensors[f"{name}.zeros"] = qw.zeros.detach().round().cpu().to(torch.uint8).contiguous()
        g_idx = getattr(qw, "g_idx", None)
        if g_idx is not None:
            tensors[f"{name}.g_idx"] = g_idx.detach().cpu().to(torch.int32).contiguous()
        if getattr(qw, "global_scale", None) is not None:
            tensors[f"{name}.global_scale"] = qw.global_scale.detach().float().cpu().reshape(1).contiguous()
        weight = weight_of(model, name).detach()
        if not _same(recover_codes(weight, qw), qw.codes):
            tensors[f"{name}.codes"] = qw.codes.detach().cpu().contiguous()
            need_codes.append(name)
    for name, scale in (act_scales or {}).items():
        tensors[f"{name}.input_scale"] = scale.detach().float().cpu().reshape(1).contiguous()
    for name, kv in (kv_scales or {}).items():
        tensors.update({f"{name}.{k}_scale": v.detach().float().cpu().reshape(1).contiguous() for k, v in kv.items()})
    save_file(tensors, str(Path(folder) / QPARAMS_FILE))
    return {"qparams": QPARAMS_FILE, "codes_stored": need_codes}


def read_quantized(folder: str | Path, model: Any) -> dict[str, Any]:
    """The ``{layer name: QuantizedWeight}`` of a ``fake_quant_model`` folder loaded as ``model``.

    Raises :class:`LlmcError` when the folder has no parameters (saved by an older llmc) or when
    they do not reproduce the stored weights exactly (an edited folder, a mismatched file).
    """
    import torch
    from safetensors.torch import load_file

    from llmc_core.layer_ops import weight_of
    from llmc_core.quant.fake import QuantizedWeight

    folder = Path(folder)
    info_path = folder / INFO_FILE
    if not info_path.is_file() or not (folder / QPARAMS_FILE).is_file():
        raise LlmcError(f"{folder}: no {QPARAMS_FILE} beside the weights (the folder was not written by save_fake of this llmc version); run the config again with the export's save flag (e.g. save.save_vllm: true).")
    specs = _read_info(info_path)
    try:
        tensors = load_file(str(folder / QPARAMS_FILE))
    except damaged_file_errors() as exc:
        raise LlmcError(f"{folder / QPARAMS_FILE}: cannot be read ({first_line(exc)}); the folder is damaged, save it again from the run.") from exc
    out = {}
    for name, spec in specs.items():
        try:
            weight = weight_of(model, name).detach()
            scales = tensors[f"{name}.scales"]
        except (AttributeError, KeyError):
            raise LlmcError(f"{folder}: {INFO_FILE} names layer {name}, which the model or {QPARAMS_FILE} lacks; the folder is incomplete.") from None
        zeros = tensors.get(f"{name}.zeros", None)
        qw = QuantizedWeight(weight.new_zeros(weight.shape, dtype=torch.uint8), scales, scales.new_zeros(scales.shape) if zeros is None else zeros.float(), spec)
        if f"{name}.g_idx" in tensors:
            qw.g_idx = tensors[f"{name}.g_idx"]
        qw.global_scale = tensors.get(f"{name}.global_scale")
        try:
            if qw.zeros.shape != scales.shape or scales.ndim != 2:
                raise ValueError(f"scales {tuple(scales.shape)}, zeros {tuple(qw.zeros.shape)}")
            qw.codes = tensors[f"{name}.codes"] if f"{name}.codes" in tensors else recover_codes(weight, qw)
            fake = qw.dequantize(weight.dtype)
        except (RuntimeError, IndexError, ValueError) as exc:  # shapes or indices that do not fit the weight
            raise LlmcError(f"{folder}: the parameters of {name} in {QPARAMS_FILE} do not fit its weight {tuple(weight.shape)} ({first_line(exc)}); the folder is damaged, save it again from the run.") from None
        if not _same(fake, weight):
            raise LlmcError(f"{folder}: the weights of {name} are not what {QPARAMS_FILE} quantizes to (was the model changed after saving?); save it again from the run.")
        out[name] = qw
    return out


def _read_info(path: Path) -> dict[str, Any]:
    """``{layer name: QuantSpec}`` from ``llmc_quant.json``; anything malformed is one error line."""
    from pydantic import ValidationError

    from llmc_core.quant.spec import QuantSpec

    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        layers, per_layer = info["quantized_layers"], info.get("layer_weight", {})
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers) or not isinstance(per_layer, dict):
            raise TypeError("quantized_layers must be a list of layer names, layer_weight a mapping")
        return {name: QuantSpec.model_validate(per_layer.get(name, info["weight"])) for name in layers}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        what = f"no key {exc}" if isinstance(exc, KeyError) else first_line(exc)
        raise LlmcError(f"{path}: not a valid {INFO_FILE} ({what}); the folder is damaged, save it again from the run.") from None


def _same(a: Any, b: Any) -> bool:
    """Same shape and the same values, bit for bit (``b`` cast to ``a``'s dtype)."""
    import torch

    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or b.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.float(), b.float()
    return a.shape == b.shape and torch.equal(a.cpu(), b.cpu().to(a.dtype))


def read_scheme(folder: str | Path) -> tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]:
    """``(scheme, act_scales, kv_scales)`` of a ``fake_quant_model`` folder: the whole scheme when
    ``llmc_quant.json`` keeps one (activations, KV cache), else the weight spec alone."""
    from safetensors.torch import load_file

    from llmc_core.quant.scheme import Scheme
    from llmc_core.quant.spec import KvSpec, QuantSpec

    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    raw = info.get("scheme")
    if raw is None:
        return Scheme(QuantSpec.model_validate(info["weight"])), {}, {}
    scheme = Scheme(QuantSpec.model_validate(raw["weight"]), QuantSpec.model_validate(raw["act"]) if raw.get("act") else None, KvSpec.model_validate(raw["kvcache"]) if raw.get("kvcache") else None, raw.get("preset"))
    tensors = load_file(str(folder / QPARAMS_FILE))
    act = {k.removesuffix(".input_scale"): v for k, v in tensors.items() if k.endswith(".input_scale")}
    kv: dict[str, dict[str, Any]] = {}
    for k, v in tensors.items():
        for which in ("k", "v"):
            if k.endswith(f".{which}_scale"):
                kv.setdefault(k.removesuffix(f".{which}_scale"), {})[which] = v
    if scheme.act is not None and scheme.act.static and set(act) != set(info["quantized_layers"]):
        raise LlmcError(f"{folder}: {INFO_FILE} names a static activation scheme but {QPARAMS_FILE} lacks the input scales of some layers; save it again from the run.")
    return scheme, act, kv
