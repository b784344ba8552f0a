"""Calibration preprocessors: rows of text → ``n_samples`` token tensors of ``[1, seq_len]``
(``[1, L]`` with ``L <= seq_len`` for the recipes whose ``same_length`` is false)."""

from __future__ import annotations

import json
import random
from typing import ClassVar

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
    single document is long enough, as with WikiText rows).

    ``c4_gptq`` (ModelTC/llmc's name for GPTQ's C4 recipe, IST-DASLab/gptq's ``datautils.get_c4``)
    selects it too: the same recipe, except that GPTQ may draw a document twice and llmc draws
    documents without replacement."""

    name = "random_window"
    aliases = ("c4_gptq",)  # ModelTC/llmc's name for GPTQ's C4 recipe

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


# -- ModelTC/llmc's recipes ------------------------------------------------------------------------
#
# The recipes below follow ModelTC/llmc's calibration preprocessors (``llmc/data/dataset/
# specified_preproc.py`` and ``base_dataset.py``), which its weight+activation configs name.
# Where ModelTC shuffles a ``datasets.Dataset`` (``dataset.shuffle(seed=42)``), llmc draws the same
# permutation (:func:`_dataset_order`), so the same rows and seed pick the same documents; where
# ModelTC draws from Python's global ``random``, llmc draws from ``random.Random(calib.seed)``, so a
# seed always gives the same samples. Two differences hold for all of them: a recipe that cannot
# give ``n_samples`` samples says so in one line (ModelTC returns fewer, or fails inside Python),
# and whitespace-only rows are never a document.


def _dataset_order(n: int, seed: int) -> list[int]:
    """The order ``datasets.Dataset.shuffle(seed=seed)`` puts ``n`` rows in: a permutation drawn
    by numpy's ``default_rng(seed)``."""
    import numpy as np

    return np.random.default_rng(seed).permutation(n).tolist()


def _encode_truncated(tokenizer, text: str, seq_len: int, special: bool = True) -> list[int]:
    """Token ids of ``text``, cut to its first ``seq_len`` (``truncation=True, max_length=seq_len``)."""
    return tokenizer(text, max_length=seq_len, truncation=True, add_special_tokens=special, return_attention_mask=False)["input_ids"]


class TxtGeneral(Preproc):
    """ModelTC/llmc's general text recipe (``txt_general_preproc``): shuffle the documents with
    ``calib.seed`` and keep the first ``n_samples`` that have at least ``seq_len`` tokens, each cut
    to its first ``seq_len`` tokens.

    Every sample is one document's beginning, never a join of documents: a ``[1, seq_len]`` tensor,
    so any ``calib.bs`` works. Shorter documents are skipped; data with fewer than ``n_samples``
    documents of ``seq_len`` tokens is refused (ModelTC returns fewer). The shuffle is
    ``datasets.Dataset.shuffle(seed=calib.seed)``'s order, ModelTC's with its ``seed: 42``.
    ``general`` (ModelTC's older name) selects it too. Example (ModelTC's ``smoothquant_w_a.yml``)::

        calib:
          name: pileval
          path: /data/pile/val.jsonl.zst
          n_samples: 512
          bs: 1
          seq_len: 512
          preproc: txt_general_preproc
          seed: 42
    """

    name = "txt_general_preproc"
    aliases = ("general",)

    def samples(self, rows, tokenizer, n_samples, seq_len, seed):
        out = _truncated_documents(rows, tokenizer, n_samples, seq_len, seed, lambda n: n == seq_len)
        if len(out) < n_samples:
            raise LlmcError(
                f"calib.n_samples: txt_general_preproc needs {n_samples} documents of at least {seq_len} tokens (calib.seq_len), "
                f"but the data has only {len(out)}. Lower calib.n_samples or calib.seq_len, or use more data."
            )
        return out


class PilevalSmooth(Preproc):
    """SmoothQuant's calibration recipe as ModelTC/llmc names it (``pileval_smooth``): shuffle the
    documents with ``calib.seed`` and take the first ``n_samples`` non-empty ones, each cut to its
    first ``seq_len`` tokens, whatever its length.

    Follows SmoothQuant (Xiao et al., 2023; mit-han-lab/smoothquant's ``calibration.py``, which
    reads the Pile validation set with ``max_length=seq_len, truncation=True``). Samples are
    ``[1, L]`` with ``L <= seq_len``: documents are never joined or padded, because llmc's
    calibration batches carry no attention mask, so padding tokens would enter the method's
    statistics. A batch holds samples of one length only, so a run needs ``calib.bs: 1`` (refused
    before the model loads otherwise, unless ``n_samples`` is 1). The shuffle is
    ``datasets.Dataset.shuffle(seed=calib.seed)``'s order, ModelTC's with its ``seed: 42``.
    Example::

        calib:
          name: pileval
          path: /data/pile/val.jsonl.zst
          n_samples: 512
          bs: 1
          seq_len: 512
          preproc: pileval_smooth
          seed: 42
    """

    name = "pileval_smooth"
    same_length: ClassVar[bool] = False  # read by this package's llmc_run_start: calib.bs must be 1

    def samples(self, rows, tokenizer, n_samples, seq_len, seed):
        out = _truncated_documents(rows, tokenizer, n_samples, seq_len, seed, lambda n: n > 0)
        if len(out) < n_samples:
            raise LlmcError(
                f"calib.n_samples: pileval_smooth takes one sample per document and needs {n_samples}, "
                f"but the data has only {len(out)} non-empty documents. Lower calib.n_samples or use more data."
            )
        return out


class _JoinedWindows(Preproc):
    """Join rows with ``"\\n\\n"``, tokenize once, and cut ``n_samples`` windows of ``seq_len``
    tokens at random starts (windows may overlap), as GPTQ's ``datautils`` does for WikiText-2."""

    shuffle_rows: ClassVar[bool] = False  # shuffle the rows (with the windows' generator) before joining
    first_rows: ClassVar[int | None] = None  # join only the first rows

    def samples(self, rows, tokenizer, n_samples, seq_len, seed):
        import torch

        rng = random.Random(seed)
        rows = list(rows[: self.first_rows] if self.first_rows else rows)
        if self.shuffle_rows:
            rng.shuffle(rows)
        ids = _encode(tokenizer, "\n\n".join(rows))
        if len(ids) <= seq_len:
            what = f"the first {self.first_rows} rows" if self.first_rows else "the data"
            raise LlmcError(
                f"calib.seq_len: {self.name} cuts {n_samples} windows of {seq_len} tokens from {what} joined with blank lines, "
                f"which is only {len(ids)} tokens; a window needs {seq_len + 1}. Lower calib.seq_len or use more data."
            )
        ids_t = torch.tensor([ids], dtype=torch.long)
        out = []
        for _ in range(n_samples):
            start = rng.randint(0, len(ids) - seq_len - 1)
            out.append(ids_t[:, start : start + seq_len].clone())
        return out


class WikiText2Gptq(_JoinedWindows):
    """GPTQ's WikiText-2 recipe (``wikitext2_gptq``): all rows joined with ``"\\n\\n"`` (the
    perplexity protocol's join), tokenized once, and ``n_samples`` windows of ``seq_len`` tokens at
    random starts drawn with ``calib.seed`` (windows may overlap).

    Follows GPTQ (Frantar et al., 2023; IST-DASLab/gptq's ``datautils.get_wikitext2``) and
    ModelTC/llmc's ``wikitext2_gptq``. Unlike ``random_window`` it never picks a single row: WikiText
    rows are lines, so its windows cross paragraphs as GPTQ's do. Data of ``seq_len`` tokens or
    fewer is refused. Example::

        calib:
          name: wikitext2
          path: /data/wikitext2          # wiki.train.raw (or wiki.valid.raw)
          n_samples: 128
          bs: -1
          seq_len: 2048
          preproc: wikitext2_gptq
          seed: 42
    """

    name = "wikitext2_gptq"


class RandomTruncateTxt(_JoinedWindows):
    """ModelTC/llmc's ``random_truncate_txt``: shuffle the rows with ``calib.seed``, join them
    with ``"\\n\\n"``, tokenize once, and cut ``n_samples`` windows of ``seq_len`` tokens at random
    starts (the same generator; windows may overlap).

    GPTQ's window recipe (as ``wikitext2_gptq``) on rows in a random order, for a text file of
    your own (ModelTC uses it with ``load_from_txt``). Data of ``seq_len`` tokens or fewer is
    refused. Example::

        calib:
          name: custom
          path: /data/my_text.txt
          n_samples: 128
          bs: -1
          seq_len: 512
          preproc: random_truncate_txt
          seed: 42
    """

    name = "random_truncate_txt"
    shuffle_rows = True


class PilevalOmni(_JoinedWindows):
    """OmniQuant's Pile recipe (``pileval_omni``): the first 1000 documents joined with
    ``"\\n\\n"``, tokenized once, and ``n_samples`` windows of ``seq_len`` tokens at random starts
    drawn with ``calib.seed`` (windows may overlap).

    Follows OmniQuant (Shao et al., 2024; OpenGVLab/OmniQuant's ``datautils.get_pile``) and
    ModelTC/llmc's ``pileval_omni``: the documents are taken in file order, not shuffled. Fewer
    than ``seq_len + 1`` tokens in those documents is refused. Example::

        calib:
          name: pileval
          path: /data/pile/val.jsonl.zst
          n_samples: 128
          bs: -1
          seq_len: 2048
          preproc: pileval_omni
          seed: 42
    """

    name = "pileval_omni"
    first_rows = 1000


def chat_messages(row: str, index: int) -> list[dict]:
    """The chat messages a calibration row holds: a JSON list of ``{"role", "content"}`` objects,
    or a JSON object with such a list under ``messages`` (an UltraChat row)."""
    try:
        value = json.loads(row)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        value = value.get("messages")
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)):
        raise LlmcError(
            f"calib.preproc: ultrachat_general reads chat messages, and row {index} is not a JSON list of "
            f'{{"role", "content"}} messages (nor an object with "messages"): {row[:60]!r}. '
            "Use calib.name: ultrachat, or rows of JSON messages (docs/data.md)."
        )
    return value


class UltrachatGeneral(Preproc):
    """ModelTC/llmc's chat recipe (``ultrachat_general``): shuffle the conversations with
    ``calib.seed``, take the first ``n_samples``, render each with the tokenizer's chat template
    (``apply_chat_template``, not tokenized) and tokenize the text without adding special tokens
    again, cut to its first ``seq_len`` tokens.

    The calibration recipe of llm-compressor's examples (HuggingFaceH4/ultrachat_200k, its
    ``train_sft`` split), as ModelTC/llmc's ``ultrachat_general`` has it. Rows are conversations:
    ``calib.name: ultrachat`` gives them, and any row may be a JSON list of ``{"role", "content"}``
    messages or an object with ``messages``; anything else is refused naming the row. A tokenizer
    without a chat template is refused. Samples are ``[1, L]`` with ``L <= seq_len`` (never padded:
    llmc's batches carry no attention mask), so a run needs ``calib.bs: 1`` (refused before the
    model loads otherwise, unless ``n_samples`` is 1). The shuffle is
    ``datasets.Dataset.shuffle(seed=calib.seed)``'s order, ModelTC's with its ``seed: 42``.
    Example::

        calib:
          name: ultrachat
          path: /data/ultrachat_200k     # a save_to_disk folder or JSON lines with messages
          n_samples: 512
          bs: 1
          seq_len: 2048
          preproc: ultrachat_general
          seed: 42
    """

    name = "ultrachat_general"
    same_length: ClassVar[bool] = False  # read by this package's llmc_run_start: calib.bs must be 1

    def samples(self, rows, tokenizer, n_samples, seq_len, seed):
        import torch

        if not getattr(tokenizer, "chat_template", None):
            raise LlmcError("calib.preproc: ultrachat_general renders conversations with the tokenizer's chat template, and this tokenizer has none. Use a chat model's tokenizer (model.tokenizer_path), or another preproc.")
        chosen = [i for i in _dataset_order(len(rows), seed) if rows[i].strip()][:n_samples]
        if len(chosen) < n_samples:
            raise LlmcError(f"calib.n_samples: ultrachat_general takes one sample per conversation and needs {n_samples}, but the data has only {len(chosen)}. Lower calib.n_samples or use more data.")
        out = []
        for i in chosen:
            text = tokenizer.apply_chat_template(chat_messages(rows[i], i), tokenize=False)
            ids = _encode_truncated(tokenizer, text, seq_len, special=False)
            out.append(torch.tensor([ids], dtype=torch.long))
        return out


def _truncated_documents(rows, tokenizer, n_samples, seq_len, seed, keep):
    """Up to ``n_samples`` ``[1, L]`` samples: the non-empty documents in the seed's shuffled order,
    each cut to its first ``seq_len`` tokens, kept when ``keep(L)``."""
    import torch

    out = []
    for i in _dataset_order(len(rows), seed):
        if len(out) == n_samples:
            break
        if not rows[i].strip():
            continue
        ids = _encode_truncated(tokenizer, rows[i], seq_len)
        if keep(len(ids)):
            out.append(torch.tensor([ids], dtype=torch.long))
    return out
