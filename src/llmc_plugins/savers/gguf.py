"""The ``gguf`` saver: one ``.gguf`` file llama.cpp, Ollama and LM Studio run (``save.save_gguf: true``)."""

from __future__ import annotations

import logging
from pathlib import Path

from llmc_core.api import Saver
from llmc_core.errors import LlmcError

log = logging.getLogger("llmc")


class SaveGguf(Saver):
    """The quantized model as ``save_path/gguf_model/model.gguf``, holding llmc's own codes and scales.

    ``quant.weight`` picks the type: ``bit: 4, symmetric: true, granularity: per_group,
    group_size: 32`` is Q4_0, asymmetric Q4_1; ``bit: 5`` Q5_0 / Q5_1; ``bit: 8, symmetric: true``
    Q8_0. With ``save_gguf`` on, the run quantizes on that type's grid by itself (float16 scales;
    asymmetric specs: the float16 min of each block as Q4_1 stores it), so llama.cpp dequantizes exactly
    llmc's ``fake_quant`` weights. Layers llmc leaves in float (embeddings, norms, ``lm_head``)
    are float16 (norms and biases float32). Llama, Mistral, Qwen2 and Qwen3 models so far; the
    tokenizer comes from the source ``.gguf`` or from the Hugging Face tokenizer. Needs the
    ``gguf`` package (``pip install 'llmc[gguf]'``). The writing is
    :mod:`llmc_plugins.savers.gguf_format`.
    """

    name = "gguf"
    folder = "gguf_model"
    position = "fake_quant"

    @classmethod
    def accepts(cls, scheme):
        from llmc_plugins.savers.gguf_format import type_problems

        problems = [f"{p}." for p in type_problems(scheme)]
        if not problems and cls.fit_scheme(scheme) != scheme:  # ``llmc export`` of a model quantized without save_gguf
            problems.append(f"the weights were quantized on {scheme.weight.scale_dtype} scales{'' if scheme.weight.symmetric else ' and integer zero points'}, not on the float16 grid a GGUF block stores; run the config again with save.save_gguf: true (the run then quantizes on that grid).")
        return problems

    @classmethod
    def fit_scheme(cls, scheme):
        from dataclasses import replace

        from llmc_core.quant.spec import QuantSpec

        w = scheme.weight
        if w.is_float:
            return scheme
        grid = {"scale_dtype": "float16", "zero_dtype": "int", "signed_scale": True} if w.symmetric else {"scale_dtype": "float16", "zero_dtype": "float16"}
        return replace(scheme, weight=QuantSpec(**{**w.model_dump(), **grid}))

    def check(self, run_config):
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise LlmcError("save.save_gguf: needs the 'gguf' package: pip install 'llmc[gguf]'.") from None

    def check_model(self, adapter):
        from llmc_plugins.savers.gguf_format import model_problems

        problems = model_problems(adapter.model)
        if problems:
            raise LlmcError(*problems)

    def save(self, state, folder):
        from llmc_plugins.savers.gguf_format import write_gguf

        source = _source_gguf(state.config)
        if source is None:
            log.warning("save_gguf: the tokenizer is written from the Hugging Face tokenizer with llama.cpp's default pre-tokenizer rule; check llama.cpp's tokenization of your text (loading from a .gguf copies its tokenizer exactly)")
        counts = write_gguf(state.model, state.quantized, Path(folder) / "model.gguf", state.tokenizer, source)
        log.info("save_gguf: %s", ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))


def _source_gguf(run_config) -> Path | None:
    """The ``.gguf`` file the model was loaded from, if it was (its tokenizer is copied as it is)."""
    model = getattr(run_config, "model", None)
    path = getattr(model, "tokenizer_path", None) or getattr(model, "path", None)
    if path and str(path).endswith(".gguf") and Path(path).is_file():
        return Path(path)
    return None
