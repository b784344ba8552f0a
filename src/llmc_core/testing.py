"""Test helpers for llmc and for plugin authors (registered as a pytest plugin).

- :func:`tiny_llama` builds a small random Llama in memory (seconds, no download).
- :func:`save_tiny_llama` writes one as a HF folder with a word-level tokenizer.
- :func:`tiny_model` / :func:`save_tiny_model` do the same for every supported family
  (Qwen3, Gemma 2/3, Phi-3, Mixtral, Qwen2/3-MoE...) from transformers' config classes.
- :func:`block_context` builds one block's ``BlockContext`` with its captured inputs, in one call
  (to test a method's ``transform_block`` / ``quantize_block`` without a run).
- :func:`run_config` builds a run-config mapping with sensible small defaults.
- :func:`run_cli` runs ``llmc`` in-process and captures exit code, stdout and stderr.
- :func:`write_config` writes a config mapping as YAML; :func:`read_results` reads a run's
  ``results.json`` back as ``{(position, evaluator, dataset, metric): value}``.
- :func:`registered` registers a plugin module in-process for the duration of a ``with`` block,
  so a plugin can be tested before it is installed.

Fixtures: ``tiny_model_dir`` (a saved tiny Llama folder), ``tiny_text_file`` (a small corpus),
``llmc_cli`` (the :func:`run_cli` function), ``fresh_plugins`` (a process-wide plugin manager built
anew for one test and forgotten after it, for tests that change the environment or entry points).

The module is registered as a pytest plugin through the ``pytest11`` entry point, so the fixtures
are available in any project that has llmc installed, with no ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmc_core import hookimpl

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly hex many bold jocks "
    "and river stones glitter under pale moon light as old ships sail toward distant harbors"
).split()


def tiny_llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab: int = 128, seed: int = 0, tie: bool = True):
    """A randomly initialised ``LlamaForCausalLM`` small enough for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # give the norms some spread so activation-aware methods have work to do
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.rand_like(p))
    return model


# Small per-family settings on top of the common tiny shape (hidden 64, 4 heads, 2 KV heads of 16).
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "phi3": {},
    "gemma2": {"query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0, "sliding_window": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
}


def tiny_model(model_type: str, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab: int = 128, seed: int = 0, outliers: int = 4, attn: str = "eager", **overrides: Any):
    """A tiny random causal LM of any family in :data:`FAMILY_CONFIGS` (built in memory from
    transformers' own config class: no download). ``outliers`` input channels of every norm are
    scaled up (x8) so activation-aware methods find outliers, as in real checkpoints. ``attn``:
    the attention implementation (``eager`` also returns the attention weights; ``sdpa``, what
    real checkpoints load with, returns ``None`` for them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(FAMILY_CONFIGS[model_type])
    kwargs.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kwargs)
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg).eval()
    offset = 1.0 if model_type.startswith("gemma") else 0.0  # Gemma's norms scale by 1 + weight
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                gain = 1 + 0.5 * torch.rand(p.shape, generator=gen)
                if p.shape[0] == hidden and outliers:
                    gain[torch.randperm(hidden, generator=gen)[:outliers]] *= 8
                p.copy_(gain - offset)
    return model


def save_tiny_model(folder: str | Path, model_type: str, **kwargs: Any) -> Path:
    """Write :func:`tiny_model` and a word tokenizer to ``folder`` as a HF model folder."""
    folder = Path(folder)
    model = tiny_model(model_type, **kwargs)
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer(kwargs.get("vocab", 128)).save_pretrained(folder)
    return folder


def word_tokenizer(vocab: int = 128):
    """A fast word-level tokenizer over :data:`WORDS` plus special tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_map = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab_map.setdefault(w, len(vocab_map))
    for i in range(len(vocab_map), vocab):
        vocab_map[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny_llama(folder: str | Path, **kwargs: Any) -> Path:
    """Write a tiny Llama and its tokenizer to ``folder`` as a HF model folder."""
    folder = Path(folder)
    model = tiny_llama(**kwargs)
    model.save_pretrained(folder, safe_serialization=True)
    word_tokenizer(kwargs.get("vocab", 128)).save_pretrained(folder)
    return folder


def block_context(model: Any = None, index: int = 0, n_samples: int = 2, seq_len: int = 16, adapter: Any = None, seed: int = 0) -> Any:
    """One decoder block's :class:`~llmc_core.blockwise.BlockContext` with its calibration inputs,
    as the run hands it to ``transform_block``: ``ctx.inputs`` is one ``[n_samples, seq_len,
    hidden]`` batch of the block's inputs (random token ids through the blocks before it) and
    ``ctx.kwargs`` its keyword inputs, captured with :func:`~llmc_core.blockwise.capture_block_inputs`.

    ``model``: default a :func:`tiny_llama`; ``adapter``: default the registered model family
    whose ``model_types`` has the model's ``model_type`` (everything stays on the CPU).
    """
    import torch

    from llmc_core.blockwise import BlockContext, capture_block_inputs, kwargs_for

    model = tiny_llama() if model is None else model
    if adapter is None:
        from llmc_core.plugins import get_manager

        manager, kind = get_manager(), getattr(model.config, "model_type", None)
        family = next((f for f in (manager.get("model", n, "model.type") for n in manager.names("model")) if kind in getattr(f, "model_types", ())), None)
        if family is None:
            raise ValueError(f"no registered model family loads model_type {kind!r}; pass adapter=")
        adapter = family().adapter(model)
    device = torch.device("cpu")
    ids = torch.randint(3, model.config.vocab_size, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))
    inputs, kwargs = capture_block_inputs(model, adapter, [ids], device)
    blocks = adapter.blocks()
    with torch.no_grad():
        for i in range(index):  # the inputs of block ``index`` are the outputs of the ones before it
            inputs = BlockContext(i, blocks[i], adapter.block_prefix(i), adapter, inputs, kwargs_for(kwargs, i), device).forward()
    return BlockContext(index, blocks[index], adapter.block_prefix(index), adapter, inputs, kwargs_for(kwargs, index), device)


def write_corpus(path: str | Path, n_rows: int = 400, seed: int = 0) -> Path:
    """A small random-word corpus, one document per line (works as ``custom`` .txt or wiki raw)."""
    import random

    rng = random.Random(seed)
    rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n_rows)]
    path = Path(path)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_config(
    model_dir: str | Path,
    data: str | Path,
    save_path: str | Path,
    method: str = "rtn",
    bit: int = 4,
    group_size: int = 32,
    eval_pos: tuple[str, ...] = ("pretrain", "fake_quant"),
    symmetric: bool = False,
    special: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A complete run-config mapping for a tiny model; keyword sections replace defaults.

    ``symmetric`` and ``special`` fill ``quant.weight.symmetric`` and ``quant.special`` (the
    method's own options); any other section (``eval=...``, ``calib=...``) replaces the default.
    """
    cfg: dict[str, Any] = {
        "base": {"seed": 0},
        "model": {"type": "llama", "path": str(model_dir), "torch_dtype": "float32"},
        "calib": {"name": "custom", "path": str(data), "n_samples": 4, "bs": -1, "seq_len": 32, "preproc": "pileval_awq", "seed": 0},
        "eval": {"eval_pos": list(eval_pos), "name": "custom", "path": str(data), "seq_len": 64, "bs": 2},
        "quant": {"method": method, "weight": {"bit": bit, "symmetric": symmetric, "granularity": "per_group", "group_size": group_size}, "special": dict(special or {})},
        "save": {"save_path": str(save_path)},
    }
    cfg.update(sections)
    return cfg


def write_config(path: str | Path, cfg: dict[str, Any]) -> Path:
    """Write ``cfg`` as a YAML file at ``path`` (for ``llmc run``/``validate``); return the path."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def read_results(save_path: str | Path) -> dict[tuple[str, str, str, str], float]:
    """The records of ``save_path/results.json`` keyed by ``(position, evaluator, dataset, metric)``."""
    import json

    payload = json.loads((Path(save_path) / "results.json").read_text(encoding="utf-8"))
    return {(r["position"], r["evaluator"], r["dataset"], r["metric"]): r["value"] for r in payload["results"]}


@contextlib.contextmanager
def registered(module: Any, name: str | None = None, distribution: str = "test") -> Iterator[Any]:
    """Register ``module`` (a plugin module or object) on the process-wide plugin manager for the
    duration of the block and unregister it by name afterwards; yields the manager.

    Registration runs the same checks as entry-point discovery: a misspelled hook fails here, a
    duplicate name when a registry is next used. A module that is already registered (installed)
    is left as it is.
    """
    from llmc_core.plugins import get_manager

    manager = get_manager()
    if manager.pm.is_registered(module):  # e.g. installed too: leave it as it was
        yield manager
        return
    name = name or f"{distribution}:{getattr(module, '__name__', type(module).__name__)}"
    manager.register_module(module, name=name, distribution=distribution)
    try:
        yield manager
    finally:
        manager.unregister(name)


class StopAfterBlock:
    """A lifecycle plugin that presses Ctrl-C right after block ``index`` is finished (and kept by
    the block checkpoint): register it with :func:`registered` to interrupt a run, then resume it."""

    def __init__(self, index: int = 0):
        self.index = index

    @hookimpl
    def llmc_block_done(self, run: Any, index: int, block: Any) -> None:
        if index == self.index:
            raise KeyboardInterrupt


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Run ``llmc ARGS`` in-process; return exit code and captured output."""
    from llmc_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse --help / --version / usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture
def llmc_cli():
    return run_cli


@pytest.fixture
def fresh_plugins():
    """Forget the process-wide plugin manager before and after the test; yields ``reset_manager``
    (call it again after changing ``LLMC_DISABLE_PLUGIN_AUTOLOAD`` or the entry points)."""
    from llmc_core.plugins import reset_manager

    reset_manager()
    try:
        yield reset_manager
    finally:
        reset_manager()
