"""Loading a model and tokenizer through transformers, from a HF folder or a ``.gguf`` file."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import field_validator

from llmc_core.api import StrictModel
from llmc_core.errors import LlmcError, damaged_file_errors, first_line

F = TypeVar("F", bound=Callable[..., Any])

DTYPES = ("auto", "float32", "float16", "bfloat16")


class HFModelConfig(StrictModel):
    """The ``model`` section.

    - ``type``: the family, case-insensitive: ``auto`` (from the checkpoint's ``model_type``) or one
      of ``llmc plugins``' model families (``Llama``, ``Qwen3``, ``Gemma2``, ``Phi3``, ``Mixtral``...).
    - ``path``: a HF model folder, a ``.gguf`` file, ``pkg:<package>/<file>``, or a hub id.
    - ``torch_dtype``: ``auto`` (the checkpoint's own), ``float32``, ``float16``, ``bfloat16``.
    - ``tokenizer_path``: defaults to ``path``. ``tokenizer_mode``: ``fast`` or ``slow``.
    - ``trust_remote_code``: off unless set here.
    """

    type: str
    path: str
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    tokenizer_path: str | None = None
    tokenizer_mode: Literal["fast", "slow"] = "fast"
    trust_remote_code: bool = False

    @field_validator("path")
    @classmethod
    def _weights_are_whole(cls, value: str) -> str:
        if os.path.isdir(value):  # a hub id or a .gguf file is read when the model loads
            problems = [p for f in sorted(Path(value).glob("*.safetensors")) if (p := safetensors_problem(f))]
            if problems:
                raise ValueError("; ".join(problems))
        return value


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (a header that does not parse, tensors that end
    past the end of the file), from its header alone; None when it is whole. Cheap: the header is
    a few KB however big the file is."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little") if size >= 8 else None
            if length is None or length > size - 8:
                return f"{path.name} is cut short ({size} bytes, less than its header says); download or save the model again"
            header = json.loads(fh.read(length))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return f"{path.name} is not a readable safetensors file ({first_line(exc)}); download or save the model again"
    need = 8 + length + max(ends, default=0)
    if need > size:
        return f"{path.name} is cut short: its tensors need {need} bytes, the file has {size}; download or save the model again"
    return None


def _split_gguf(path: str) -> tuple[str, dict[str, Any]]:
    p = Path(path)
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def _damaged_files_are_errors(load: F) -> F:
    """A model file that cannot be read (truncated safetensors, a GGUF cut inside its header, a
    pickle that ``torch.load(weights_only=True)`` refuses) is one error line naming ``model.path``."""

    @functools.wraps(load)
    def wrapper(config: HFModelConfig, *args: Any) -> Any:
        try:
            return load(config, *args)
        except LlmcError:
            raise
        except damaged_file_errors() as exc:
            import pickle

            if isinstance(exc, pickle.UnpicklingError):  # torch's message is a page long
                why = "a pickle weight file that torch.load(weights_only=True) refuses: it holds objects other than tensors, or is damaged. llmc never unpickles code; convert the model to safetensors where you trust it"
            else:
                why = f"{first_line(exc)}. If a file is truncated or damaged, download or save the model again"
            raise LlmcError(f"model.path: {config.path} cannot be loaded ({why}).") from exc

    return wrapper  # type: ignore[return-value]


def read_model_type(config: HFModelConfig) -> str:
    """The checkpoint's ``model_type`` (config.json, or what transformers reads from a GGUF file)."""
    from transformers import AutoConfig

    where, extra = _split_gguf(config.path)
    _need_gguf(extra)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=config.trust_remote_code, **extra).model_type
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmcError(f"model.path: {config.path} has no readable model config ({first}). Give a Hugging Face model folder with config.json, a .gguf file, or pkg:<package>/<file>.") from exc


def _need_gguf(extra: dict[str, Any]) -> None:
    if extra:
        try:
            import gguf  # noqa: F401
        except ImportError as exc:
            raise LlmcError("model.path is a .gguf file, which needs the 'gguf' package: pip install 'llmc[gguf]'.") from exc


def _type_hint(model_type: str) -> str:
    from llmc_plugins.models.families import supported_families

    types = sorted({t for f in supported_families() for t in getattr(f, "model_types", ())})
    if model_type in types:
        return "Set model.type: auto, or the matching family ('llmc plugins' lists them)."
    return f"No llmc family supports '{model_type}' (supported: {', '.join(types)}); with model.type: auto, quant.method: RTN works on any model whose linear layers llmc can find."


def _check_loaded(path: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not match the model: transformers initialises a
    missing weight at random and drops an unexpected one, and only logs it; a quantized model
    with a random layer must never be saved as the real one."""
    problems = []
    for key, what in (("missing_keys", "missing from the checkpoint (transformers would initialise them at random)"), ("unexpected_keys", "in the checkpoint but not in the model (they would be dropped)")):
        names = sorted(info.get(key) or ())
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"model.path: {path}: {len(names)} weight(s) {what}: {shown}. Give a complete checkpoint of this architecture.")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        problems.append(f"model.path: {path}: weight(s) of the wrong shape: {', '.join(str(m[0]) for m in mismatched[:5])}.")
    if problems:
        raise LlmcError(*problems)


def load_hf(config: HFModelConfig, model_types: tuple[str, ...], family: str) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``; refuse a checkpoint of another architecture with a clear line."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, extra = _split_gguf(config.path)
    _need_gguf(extra)
    hf_config = AutoConfig.from_pretrained(where, trust_remote_code=config.trust_remote_code, **extra)
    if hf_config.model_type not in model_types:
        raise LlmcError(
            f"model.type: '{config.type}' expects a {'/'.join(model_types)} checkpoint, but {config.path} is "
            f"'{hf_config.model_type}'. {_type_hint(hf_config.model_type)}"
        )
    dtype = "auto" if config.torch_dtype == "auto" else getattr(torch, config.torch_dtype)
    if extra and dtype == "auto":
        dtype = torch.float32  # GGUF tensors are dequantized; keep them in full precision
    model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, low_cpu_mem_usage=True, trust_remote_code=config.trust_remote_code, output_loading_info=True, **extra)
    _check_loaded(config.path, info)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and extra:
        # The GGUF weights are plain floats now; the attached quantizer would refuse save_pretrained.
        quantizer.remove_quantization_config(model)
    tok_where, tok_extra = _split_gguf(config.tokenizer_path) if config.tokenizer_path else (where, extra)
    tokenizer = AutoTokenizer.from_pretrained(tok_where, use_fast=config.tokenizer_mode == "fast", trust_remote_code=config.trust_remote_code, **tok_extra)
    model.config.use_cache = False
    return model, tokenizer


# the two functions that read a model's files, each a damaged file's one error line
read_model_type = _damaged_files_are_errors(read_model_type)
load_hf = _damaged_files_are_errors(load_hf)
