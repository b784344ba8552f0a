"""Calibration preprocessors: rows of text → ``n_samples`` token tensors of ``[1, seq_len]``."""

from __future__ import annotations

import random

from llmc_core.api import Preproc
from llmc_core.errors import LlmcError


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, return_attention_mask=False)["input_ids"]


class PilevalAwq(Preproc):
    """AWQ's calibration recipe: shuffle documents with the seed, keep non-empty ones of at most
    ``seq_len`` tokens, concatenate them and cut ``n_samples`` blocks of ``seq_len`` tokens.

    Unlike llm-awq (where ``n_samples`` counts documents and yields fewer blocks), ``n_samples`` here
    is the number of ``seq_len``-token blocks produced, so "16 x 512" means exactly that.
    """

    name = "pileval_awq"

    def samples(self, rows, tokenizer, n_samples, seq_len, seed):
        import torch

        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        needed = n_samples * seq_len
        tokens: list[int] = []
        for i in order:
            text = rows[i].strip()
            if not text:
                continue
            ids = _encode(tokenizer, text)
            if not ids or len(ids) > seq_len:
                continue
            tokens.extend(ids)
            if len(tokens) >= needed:
                break
        n = len(tokens) // seq_len
        if n < n_samples:
            raise LlmcError(
                f"calib.n_samples: {n_samples} blocks of {seq_len} tokens were asked for, but the data gives only {n} "
                "from documents of at most seq_len tokens. Lower calib.n_samples or calib.seq_len, or use more data."
            )
        t = torch.tensor(tokens[:needed], dtype=torch.long).reshape(n_samples, seq_len)
        return [t[i : i + 1] for i in range(n_samples)]


class RandomWindow(Preproc):
    """GPTQ's recipe: for each sample, a random document longer than ``seq_len`` tokens and a random
    ``seq_len`` window inside it (falls back to windows of the ``"\\n\\n"``-joined text when no
    single document is long enough, as with WikiText rows)."""

    name = "random_window"

    def samples(self, rows, tokenizer, n_samples, seq_len, seed):
        import torch

        rng = random.Random(seed)
        order = list(range(len(rows)))
        rng.shuffle(order)
        out = []
        for i in order:
            if len(out) == n_samples:
                break
            if len(rows[i]) < seq_len:  # characters: a cheap bound before tokenizing
                continue
            ids = _encode(tokenizer, rows[i])
            if len(ids) > seq_len:
                start = rng.randint(0, len(ids) - seq_len - 1)
                out.append(torch.tensor([ids[start : start + seq_len]], dtype=torch.long))
        if len(out) < n_samples:
            ids = _encode(tokenizer, "\n\n".join(rows))
            if len(ids) <= seq_len:
                raise LlmcError(f"calib: the data has only {len(ids)} tokens, fewer than calib.seq_len={seq_len}. Use more data or a smaller seq_len.")
            while len(out) < n_samples:
                start = rng.randint(0, len(ids) - seq_len - 1)
                out.append(torch.tensor([ids[start : start + seq_len]], dtype=torch.long))
        return out
