"""The GGUF file llama.cpp runs: llmc's codes and scales in GGUF's block types, written with the
``gguf`` package's writer.

A weight spec that one GGUF type stores is written as that type, from the codes and scales the
method found (no re-quantization): ``Q4_0`` / ``Q5_0`` (symmetric, 32 per block, a float16 scale
``d``: ``w = (q - 2^(b-1)) d``), ``Q4_1`` / ``Q5_1`` (asymmetric: ``w = q d + m`` with a float16
min ``m``) and ``Q8_0`` (symmetric 8-bit). ``save_gguf`` makes the run quantize on
exactly that grid (:meth:`SaveGguf.fit_scheme`: float16 scales; float16 mins, signed symmetric scales), so each
block dequantizes to llmc's fake-quantized weight bit for bit; the writer checks that with the
``gguf`` package's own dequantizer before the file is kept (fails closed).

Names and layout follow llama.cpp's: the ``gguf`` package's tensor-name map per architecture,
and for Llama-architecture models the rows of ``attn_q`` / ``attn_k`` regrouped from Hugging
Face's rotate-half order to the interleaved pairs llama.cpp's RoPE uses (each row keeps its
blocks, so quantized rows move whole). Tensors llmc did not quantize are float16 (2-D) or
float32 (norms, biases). The tokenizer is copied from the source GGUF when the model was loaded
from one, otherwise built from the Hugging Face tokenizer (``gguf.SpecialVocab`` for merges,
special tokens and the chat template).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Hugging Face model_type -> llama.cpp architecture; ``permute_qk``: Llama's rotate-half to interleaved
ARCHES: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama", "permute_qk": True},
    "mistral": {"arch": "llama", "permute_qk": True},
    "qwen2": {"arch": "qwen2", "permute_qk": False},
    "qwen3": {"arch": "qwen3", "permute_qk": False},
}
BLOCK = 32
# GGUF type -> (bits, symmetric)
TYPES = {"Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True)}


def gguf_type(spec: Any) -> str | None:
    """The GGUF type that stores an integer weight spec exactly, or None."""
    if spec.is_float or spec.granularity != "per_group" or spec.group_size != BLOCK:
        return None
    return next((t for t, (bits, sym) in TYPES.items() if bits == spec.bit and sym == spec.symmetric), None)


def type_problems(scheme: Any) -> list[str]:
    """Why ``scheme`` has no GGUF type (empty list: :func:`gguf_type` names one), with the nearest type."""
    w = scheme.weight
    if not scheme.weight_only:
        return [f"GGUF stores weights only, not {scheme.describe()} (llama.cpp quantizes activations itself). Save it with save_vllm, or quantize weights only"]
    if w.is_float:
        return [f"llmc writes GGUF's integer block types, not {w.describe()}; use e.g. quant.weight: {{bit: 4, symmetric: true, granularity: per_group, group_size: 32}} (Q4_0)"]
    if gguf_type(w) is not None:
        return []
    bit = min(TYPES.values(), key=lambda t: (abs(t[0] - w.bit), t[1] != w.symmetric))[0]
    sym = w.symmetric or bit == 8
    nearest = next(t for t, v in TYPES.items() if v == (bit, sym))
    why = "8-bit GGUF blocks (Q8_0) are symmetric" if w.bit == 8 and not w.symmetric else f"no GGUF type stores {w.describe()}"
    return [f"{why}; the nearest is {nearest}: quant.weight {{bit: {bit}, symmetric: {str(sym).lower()}, granularity: per_group, group_size: {BLOCK}}} (GGUF's legacy types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 have 32 weights per block)"]


def arch_of(model: Any) -> dict[str, Any] | None:
    return ARCHES.get(getattr(model.config, "model_type", ""))


def model_problems(model: Any) -> list[str]:
    """Why the loaded model cannot be written (empty list: it can)."""
    cfg = model.config
    if arch_of(model) is None:
        return [f"save.save_gguf: llmc writes GGUF for {', '.join(sorted(ARCHES))} models so far, not '{cfg.model_type}'. Save with save_fake and convert with llama.cpp's convert_hf_to_gguf.py (which rounds again), or save_vllm"]
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", None):
        return [f"save.save_gguf: rope scaling '{kind}' is not written to GGUF yet; save with save_fake or save_vllm"]
    return []


# -- packing: llmc's codes and scales into GGUF blocks -------------------------------------------


def pack_blocks(codes: Any, scales: Any, zeros: Any, qtype: str) -> Any:
    """``[rows, cols]`` codes (int8 symmetric, uint8 asymmetric), ``[rows, cols / 32]`` scales and
    (asymmetric) float16 mins -> ``[rows, bytes]`` uint8 in ``qtype``'s block layout (llama.cpp's ``block_q4_0``
    etc.: float16 ``d`` [, float16 ``m``] [, the fifth bits as a little-endian uint32], then
    element ``j`` of the block in the low nibble of byte ``j`` and element ``j + 16`` in its high one;
    Q8_0: the int8 codes)."""
    import numpy as np

    bits, sym = TYPES[qtype]
    rows, cols = codes.shape
    nb = cols // BLOCK
    d = scales.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    if qtype == "Q8_0":
        q = codes.astype(np.int8).reshape(rows, nb, BLOCK).view(np.uint8)
        return np.concatenate([d, q], axis=-1).reshape(rows, -1)
    q = (codes.astype(np.int16) + (1 << (bits - 1) if sym else 0)).astype(np.uint8).reshape(rows, nb, BLOCK)
    parts = [d]
    if not sym:
        parts.append(zeros.astype(np.float16).reshape(rows, nb, 1).view(np.uint8))  # the float16 min m
    if bits == 5:
        high = ((q >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
        parts.append(high.sum(axis=-1, dtype=np.uint32).astype("<u4").reshape(rows, nb, 1).view(np.uint8))
    low = q & 0xF
    parts.append(low[..., : BLOCK // 2] | (low[..., BLOCK // 2 :] << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def quantized_tensor(qw: Any, qtype: str) -> Any:
    """One quantized layer as GGUF blocks; refuses (fails closed) unless the ``gguf`` package's
    dequantizer gives back exactly llmc's fake-quantized weight."""
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from gguf import GGMLQuantizationType

    from llmc_core.errors import LlmcError

    if qw.g_idx is not None and not torch.equal(qw.g_idx.cpu(), torch.arange(qw.codes.shape[1]) // BLOCK):
        raise LlmcError("save.save_gguf: the weights were quantized in act-order groups (GPTQ actorder without static_groups), which GGUF's consecutive blocks cannot hold; set quant.special.static_groups: true.")
    codes, scales, zeros = (t.detach().cpu().numpy() for t in (qw.codes, qw.scales.float(), qw.zeros.float()))
    blocks = pack_blocks(codes, scales, zeros, qtype)
    back = dequantize(blocks, GGMLQuantizationType[qtype])
    if not np.array_equal(back, qw.dequantize(torch.float32).cpu().numpy()):
        raise LlmcError(f"save.save_gguf: a {qtype} block does not dequantize to llmc's weight (the layer was not quantized on GGUF's float16 grid); nothing was saved. Quantize again with save.save_gguf: true in the same run.")
    return blocks


def permute_rows(t: Any, heads: int) -> Any:
    """Rows of a q/k projection (``[heads * head_dim, ...]``, any trailing layout whose rows stay
    whole) from Hugging Face's rotate-half order (first halves, then second halves of each head's
    dimensions) to the interleaved pairs llama.cpp's Llama RoPE rotates."""
    rest = t.shape[1:]
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *rest).swapaxes(1, 2).reshape(t.shape)


# -- the file ----------------------------------------------------------------------------------


def write_gguf(model: Any, quantized: dict[str, Any], path: Path, tokenizer: Any = None, source_gguf: Path | None = None, float_type: str = "f16") -> dict[str, int]:
    """Write ``model`` (its quantized layers from ``quantized``) to the GGUF file ``path``; returns
    how many tensors of each GGUF type it holds."""
    import gguf
    import numpy as np

    cfg = model.config
    info = arch_of(model)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == info["arch"])
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), info["arch"])
    counts: dict[str, int] = {}
    qtypes = set()
    state = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            from llmc_core.errors import LlmcError

            raise LlmcError(f"save.save_gguf: no llama.cpp tensor name for '{hf_name}' ({info['arch']}); nothing was saved.")
        layer = hf_name.removesuffix(".weight")
        qw = quantized.get(layer) if hf_name.endswith(".weight") else None
        if qw is not None:
            qtype = gguf_type(qw.spec)
            data, raw = quantized_tensor(qw, qtype), gguf.GGMLQuantizationType[qtype]
            qtypes.add(qtype)
        else:
            t = tensor.detach().float().cpu().numpy()
            qtype = "F32" if t.ndim == 1 or float_type == "f32" else "F16"
            data, raw = (t if qtype == "F32" else t.astype(np.float16)), None
        if info["permute_qk"] and hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            data = permute_rows(data, heads if "q_proj" in hf_name else kv_heads)
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)
        counts[qtype] = counts.get(qtype, 0) + 1
    _metadata(writer, cfg, info, head_dim, heads, kv_heads, qtypes)
    _tokenizer(writer, tokenizer, source_gguf, cfg)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _metadata(writer: Any, cfg: Any, info: dict[str, Any], head_dim: int, heads: int, kv_heads: int, qtypes: set[str]) -> None:
    import gguf

    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or getattr(cfg, "rope_theta", None) or 10000.0
    writer.add_name(getattr(cfg, "_name_or_path", "") or cfg.model_type)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    ftype = gguf.LlamaFileType[f"MOSTLY_{qtypes.pop()}"] if len(qtypes) == 1 else gguf.LlamaFileType.GUESSED
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer(writer: Any, tokenizer: Any, source_gguf: Path | None, cfg: Any) -> None:
    """The tokenizer's GGUF keys: copied from the source GGUF, or built from the HF tokenizer."""
    import gguf

    if source_gguf is not None:
        reader = gguf.GGUFReader(str(source_gguf))
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
        return
    if tokenizer is None:
        return
    vocab = tokenizer.get_vocab()
    size = max(cfg.vocab_size, max(vocab.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    special = set(tokenizer.all_special_ids)
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    tmp = Path(writer.path).parent / ".tokenizer"  # inside the saver's own temporary folder, removed here
    try:
        tokenizer.save_pretrained(tmp)
        model = json.loads((tmp / "tokenizer.json").read_text()).get("model", {}) if (tmp / "tokenizer.json").is_file() else {}
        writer.add_tokenizer_model("gpt2" if model.get("type") == "BPE" else "none")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(tmp, load_merges=model.get("type") == "BPE").add_to_gguf(writer, quiet=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
