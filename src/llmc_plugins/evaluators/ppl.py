"""Perplexity with the standard GPTQ/AWQ protocol."""

from __future__ import annotations

import math
import time

from pydantic import Field, model_validator

from llmc_core import hookimpl
from llmc_core.api import Evaluator
from llmc_core.config import EvalSection
from llmc_core.results import EvalRecord


class PplConfig(EvalSection):
    """The ``eval`` section for ``type: ppl``.

    - ``eval_pos``: where to measure (``pretrain``, ``transformed``, ``fake_quant``).
    - ``name``/``path``/``download``: the dataset (e.g. ``wikitext2`` and a ``wiki.test.raw``).
    - ``seq_len``: window length (2048 is the standard). ``bs``: windows per forward pass.
    - ``num_samples``: evaluate only the first N windows (quick runs); default all.
    - ``inference_per_block``: run the model one block at a time on the device (for models that
      do not fit on it whole).
    - ``eval_token_consist`` (ModelTC's key): also record ``token_consistency``, the share of
      positions where the model's most likely next token is the one the ``pretrain`` model
      predicted on the same windows (needs ``pretrain`` in ``eval_pos``, measured first).
    """

    bs: int = Field(default=1, gt=0)
    seq_len: int = Field(default=2048, gt=0)
    num_samples: int | None = Field(default=None, gt=0)
    inference_per_block: bool = False
    eval_token_consist: bool = False

    @model_validator(mode="after")
    def _consistency_needs_pretrain(self) -> PplConfig:
        if self.eval_token_consist and "pretrain" not in self.eval_pos:
            raise ValueError("eval_token_consist compares each position's predictions with the pretrain model's; add pretrain to eval_pos")
        return self


class Perplexity(Evaluator):
    """Perplexity: rows joined with "\\n\\n", tokenized once, non-overlapping ``seq_len`` windows
    (tail dropped), ``ppl = exp(mean token cross-entropy)`` over all predicted tokens."""

    name = "ppl"
    Config = PplConfig

    @classmethod
    def memory(cls, shapes, config, again=False):
        """The head's logits over ``HEAD_CHUNK`` positions of ``bs`` windows (float32) three times
        (the logits, the log-softmax, the loss's temporaries), one layer's forward activations on
        ``bs × seq_len`` tokens, and tokenizing the text (measured: about 100 bytes per byte of
        the text file, while the token ids are made; not ``again``: they are cached)."""
        import os

        from llmc_core.preflight import Part

        fix = "a smaller eval.bs or eval.seq_len"
        positions = min(HEAD_CHUNK, config.seq_len - 1)
        tokens = config.bs * config.seq_len
        try:
            text = os.path.getsize(config.path) if config.path and not again else 0
        except OSError:
            text = 0
        return [
            Part("eval logits", 3 * config.bs * positions * shapes.vocab * 4, fix=fix),
            Part("eval forward", tokens * (3 * shapes.mlp_width + 4 * shapes.hidden) * shapes.dtype_bytes, fix=fix),
            Part("eval text", 100 * text, "host"),
        ]

    def evaluate(self, state, config, position):
        import torch

        start = time.perf_counter()
        ids = _token_ids(state, config)
        n_windows = ids.numel() // config.seq_len
        if config.num_samples:
            n_windows = min(n_windows, config.num_samples)
        if n_windows == 0:
            from llmc_core.errors import LlmcError

            raise LlmcError(f"eval.seq_len: the {config.name} text has {ids.numel()} tokens, fewer than one window of {config.seq_len}.")
        windows = ids[: n_windows * config.seq_len].reshape(n_windows, config.seq_len)
        hidden_fn = _per_block_hidden if config.inference_per_block else _whole_model_hidden
        head = state.model.get_output_embeddings()
        nll, count = 0.0, 0
        top = [] if config.eval_token_consist else None  # each position's most likely next token
        with torch.no_grad():
            from llmc_core.progress import progress

            for i in progress(range(0, n_windows, config.bs), desc=f"ppl {position}"):
                batch = windows[i : i + config.bs].to(state.device)
                nll += _sum_nll(hidden_fn(state, batch), batch, head, state.adapter.logits if state.adapter is not None else None, top)
                count += batch[:, 1:].numel()
        ppl = math.exp(nll / count)
        seconds = round(time.perf_counter() - start, 2)
        records = [EvalRecord(position, self.name, config.name, "perplexity", ppl, seconds)]
        if top is not None:
            predicted = torch.cat(top)  # the same order at every position
            key = ("ppl_top1", config.name, config.path, config.seq_len, n_windows)
            if position == "pretrain":
                state.cache[key] = predicted
            elif key in state.cache:
                same = float((predicted == state.cache[key]).float().mean())
                records.append(EvalRecord(position, self.name, config.name, "token_consistency", same, seconds))
        return records


def _token_ids(state, config):
    key = ("ppl_ids", config.name, config.path)
    if key not in state.cache:
        rows = state.manager.get("dataset", config.name, "eval.name")().read_rows(config.path, config.download, "eval", "eval.path")
        text = "\n\n".join(rows)
        state.cache[key] = state.tokenizer(text, return_tensors="pt").input_ids[0]
    return state.cache[key]


# Logits of a whole window (2048 x 49152 floats for SmolLM2 = 400 MB, twice with the softmax) would
# dominate the memory of a small model's run: the head is applied a slice of positions at a time.
HEAD_CHUNK = 512


def _sum_nll(hidden, batch, head, finish=None, top=None):
    """Summed next-token cross-entropy of ``batch`` from the final hidden states, ``HEAD_CHUNK``
    positions at a time; ``finish`` turns the head's output into the model's logits (the
    adapter's ``logits``: Gemma's soft-capping). ``top`` (a list) collects each slice's argmax
    tokens (flattened, on the CPU)."""
    import torch

    total = 0.0
    last = hidden.shape[1] - 1
    for s in range(0, last, HEAD_CHUNK):
        e = min(s + HEAD_CHUNK, last)
        logits = head(hidden[:, s:e])
        logits = (logits if finish is None else finish(logits)).float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, s + 1 : e + 1].reshape(-1), reduction="sum").item()
        if top is not None:
            top.append(logits.argmax(dim=-1).reshape(-1).cpu())
    return total


def _whole_model_hidden(state, batch):
    state.model.to(state.device)
    return state.model.base_model(input_ids=batch, use_cache=False).last_hidden_state


def _per_block_hidden(state, batch):
    from llmc_core.blockwise import capture_block_inputs, run_blocks

    inputs, kwargs = capture_block_inputs(state.model, state.adapter, [batch], state.device)
    hidden = run_blocks(state.adapter, inputs, kwargs, state.device)[0]
    head = state.model.get_output_embeddings()
    for module in state.adapter.post_block_modules():
        if module is not head:  # the final norm; the head is applied in slices by _sum_nll
            module.to(state.device)
            hidden = module(hidden)
    head.to(state.device)
    return hidden


@hookimpl
def llmc_register_evaluators(register):
    register(Perplexity)
