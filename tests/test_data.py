"""Datasets and calibration preprocessors on small files."""

from __future__ import annotations

import json

import pytest

from llmc_core.errors import LlmcError
from llmc_core.testing import word_tokenizer
from llmc_plugins.data.corpora import C4, Custom, PileVal, UltraChat, WikiText2
from llmc_plugins.data.preprocs import PilevalAwq, PilevalOmni, PilevalSmooth, RandomTruncateTxt, RandomWindow, TxtGeneral, UltrachatGeneral, WikiText2Gptq
from llmc_plugins.data.readers import wikitext_raw_rows


def test_wikitext_raw_rows_match_hf_layout(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Some text here . \n", encoding="utf-8")
    assert wikitext_raw_rows(raw) == ["", " = Title = \n", "", " Some text here . \n"]


def test_wikitext_folder_picks_split(tmp_path):
    (tmp_path / "wiki.test.raw").write_text("test row\n")
    (tmp_path / "wiki.valid.raw").write_text("valid row\n")
    assert WikiText2().load_rows(str(tmp_path), False, "eval") == ["test row\n"]
    assert WikiText2().load_rows(str(tmp_path), False, "calib") == ["valid row\n"]


def test_jsonl_and_zstd(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    rows = [{"text": f"doc {i}", "url": "u"} for i in range(3)]
    plain = tmp_path / "a.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    packed = tmp_path / "b.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    assert C4().load_rows(str(plain), False, "calib") == ["doc 0", "doc 1", "doc 2"]
    assert PileVal().load_rows(str(packed), False, "calib") == ["doc 0", "doc 1", "doc 2"]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(LlmcError, match=r"bad.jsonl:2: expected a JSON object"):
        C4().load_rows(str(bad), False, "calib")


def test_custom_txt(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one\n\n two \n")
    assert Custom().load_rows(str(f), False, "calib") == ["one", " two "]


def test_pileval_awq_gives_exactly_n_blocks(tiny_text_file):
    rows = tiny_text_file.read_text().splitlines()
    tok = word_tokenizer()
    samples = PilevalAwq().samples(rows, tok, n_samples=5, seq_len=32, seed=0)
    assert len(samples) == 5 and all(s.shape == (1, 32) for s in samples)
    again = PilevalAwq().samples(rows, tok, n_samples=5, seq_len=32, seed=0)
    assert all((a == b).all() for a, b in zip(samples, again))
    other = PilevalAwq().samples(rows, tok, n_samples=5, seq_len=32, seed=1)
    assert any((a != b).any() for a, b in zip(samples, other))


def test_pileval_awq_too_few_tokens_is_clear(tiny_text_file):
    rows = tiny_text_file.read_text().splitlines()[:3]
    with pytest.raises(LlmcError, match="calib.n_samples: 50 blocks of 32 tokens"):
        PilevalAwq().samples(rows, word_tokenizer(), n_samples=50, seq_len=32, seed=0)


def test_random_window(tiny_text_file):
    rows = tiny_text_file.read_text().splitlines()
    samples = RandomWindow().samples(rows, word_tokenizer(), n_samples=3, seq_len=16, seed=0)
    assert [s.shape for s in samples] == [(1, 16)] * 3


# -- ModelTC's recipes --------------------------------------------------------------------------


def numbered_docs(lengths: list[int]) -> list[str]:
    """Documents of the given token counts (word tokenizer; 0 gives ``""``): document ``k`` starts
    with its own token ``w{40+k}``, then ordinary words."""
    from llmc_core.testing import WORDS

    return [" ".join([f"w{40 + k}"] + [WORDS[(k + j) % len(WORDS)] for j in range(n - 1)]) if n else "" for k, n in enumerate(lengths)]


def ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def hf_shuffle_order(n: int, seed: int) -> list[int]:
    """The order ``datasets.Dataset.shuffle(seed=...)`` gives, as ModelTC shuffles."""
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict({"i": list(range(n))}).shuffle(seed=seed)["i"]


LENGTHS = [5, 20, 3, 16, 40, 15, 0, 25, 8, 33, 17, 2, 50, 12, 19]  # 16 = seq_len below; 0 = an empty row


def test_txt_general_keeps_documents_of_at_least_seq_len_cut_to_it_in_datasets_shuffle_order():
    rows, tok = numbered_docs(LENGTHS), word_tokenizer()
    rows[6] = "   "
    long_docs = [k for k, n in enumerate(LENGTHS) if n >= 16]  # 8 documents, the one of exactly 16 included
    samples = TxtGeneral().samples(rows, tok, n_samples=len(long_docs), seq_len=16, seed=3)
    expected = [k for k in hf_shuffle_order(len(rows), 3) if k in long_docs]
    assert [s.shape for s in samples] == [(1, 16)] * len(long_docs)
    assert [s[0].tolist() for s in samples] == [ids(tok, rows[k])[:16] for k in expected]
    again = TxtGeneral().samples(rows, tok, n_samples=4, seq_len=16, seed=3)
    assert all((a == b).all() for a, b in zip(samples[:4], again))
    other = TxtGeneral().samples(rows, tok, n_samples=4, seq_len=16, seed=4)
    assert [s[0, 0].item() for s in other] != [s[0, 0].item() for s in again]


def test_txt_general_refuses_when_too_few_documents_are_long_enough():
    rows = numbered_docs(LENGTHS)
    with pytest.raises(LlmcError, match=r"txt_general_preproc needs 9 documents of at least 16 tokens \(calib.seq_len\), but the data has only 8") as exc:
        TxtGeneral().samples(rows, word_tokenizer(), n_samples=9, seq_len=16, seed=0)
    assert len(exc.value.problems) == 1


def test_pileval_smooth_takes_the_first_non_empty_documents_cut_to_seq_len_whatever_their_length():
    rows, tok = numbered_docs(LENGTHS), word_tokenizer()
    rows[6] = ""
    non_empty = [k for k in hf_shuffle_order(len(rows), 42) if k != 6]
    samples = PilevalSmooth().samples(rows, tok, n_samples=len(non_empty), seq_len=16, seed=42)
    assert [s[0].tolist() for s in samples] == [ids(tok, rows[k])[:16] for k in non_empty]
    assert sorted({s.shape[1] for s in samples}) == sorted({min(n, 16) for n in LENGTHS if n})  # short ones kept, long ones cut
    assert all(s.dtype == torch_long() and s.shape[0] == 1 for s in samples)
    with pytest.raises(LlmcError, match=r"pileval_smooth takes one sample per document and needs 15, but the data has only 14 non-empty"):
        PilevalSmooth().samples(rows, tok, n_samples=15, seq_len=16, seed=42)


def torch_long():
    import torch

    return torch.long


def joined_windows(tok, rows, n, seq_len, rng):
    """GPTQ's draw: ``"\n\n"``-joined rows, ``randint(0, len - seq_len - 1)`` starts."""
    all_ids = ids(tok, "\n\n".join(rows))
    return [all_ids[s : s + seq_len] for s in (rng.randint(0, len(all_ids) - seq_len - 1) for _ in range(n))]


def test_wikitext2_gptq_cuts_random_windows_of_the_joined_rows():
    import random

    rows, tok = numbered_docs(LENGTHS), word_tokenizer()
    samples = WikiText2Gptq().samples(rows, tok, n_samples=6, seq_len=16, seed=5)
    assert [s[0].tolist() for s in samples] == joined_windows(tok, rows, 6, 16, random.Random(5))
    # windows of the join, not of single documents (random_window takes windows inside document 12's 50 tokens)
    firsts = {ids(tok, r)[0] for r in rows if r}
    assert any(sum(t in firsts for t in s[0].tolist()) > 1 for s in samples)
    with pytest.raises(LlmcError, match=r"calib.seq_len: wikitext2_gptq cuts 2 windows of 300 tokens from the data joined with blank lines, which is only 265 tokens"):
        WikiText2Gptq().samples(rows, tok, n_samples=2, seq_len=300, seed=5)


def test_random_truncate_txt_shuffles_the_rows_before_joining():
    import random

    rows, tok = numbered_docs(LENGTHS), word_tokenizer()
    rng = random.Random(7)
    shuffled = list(rows)
    rng.shuffle(shuffled)
    samples = RandomTruncateTxt().samples(rows, tok, n_samples=5, seq_len=16, seed=7)
    assert [s[0].tolist() for s in samples] == joined_windows(tok, shuffled, 5, 16, rng)
    assert [s[0].tolist() for s in samples] != [s[0].tolist() for s in WikiText2Gptq().samples(rows, tok, n_samples=5, seq_len=16, seed=7)]
    again = RandomTruncateTxt().samples(rows, tok, n_samples=5, seq_len=16, seed=7)
    assert all((a == b).all() for a, b in zip(samples, again))


def test_pileval_omni_reads_only_the_first_1000_documents():
    import random

    tok = word_tokenizer()
    rows = ["the quick brown fox jumps"] * 1000 + ["w100 w101 w102 w103"] * 500
    samples = PilevalOmni().samples(rows, tok, n_samples=64, seq_len=16, seed=0)
    assert [s[0].tolist() for s in samples] == joined_windows(tok, rows[:1000], 64, 16, random.Random(0))
    assert not any(t in (100, 101, 102, 103) for s in samples for t in s[0].tolist())
    with pytest.raises(LlmcError, match=r"pileval_omni cuts 1 windows of 5000 tokens from the first 1000 rows"):
        PilevalOmni().samples(rows, tok, n_samples=1, seq_len=5000, seed=0)


def test_c4_gptq_is_random_window():
    from llmc_core.plugins import get_manager

    assert get_manager().get("preproc", "c4_gptq", "calib.preproc") is RandomWindow
    assert get_manager().get("preproc", "general", "calib.preproc") is TxtGeneral


def chat_tokenizer():
    tok = word_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    return tok


def conversations(n: int) -> list[str]:
    out = []
    for k in range(n):
        messages = [{"role": "user", "content": f"w{40 + k} the quick fox"}, {"role": "assistant", "content": "a lazy dog " * (k % 5 + 1)}]
        out.append(json.dumps(messages if k % 2 else {"messages": messages, "prompt_id": str(k)}))
    return out


def test_ultrachat_general_renders_the_chat_template_and_cuts_to_seq_len():
    rows, tok = conversations(12), chat_tokenizer()
    samples = UltrachatGeneral().samples(rows, tok, n_samples=8, seq_len=10, seed=42)
    order = hf_shuffle_order(12, 42)[:8]
    for s, k in zip(samples, order):
        messages = json.loads(rows[k])
        messages = messages["messages"] if isinstance(messages, dict) else messages
        text = "".join(f"{m['role']} {m['content']} </s> " for m in messages)
        assert s[0].tolist() == tok(text, add_special_tokens=False)["input_ids"][:10]
    assert 2 in samples[0][0].tolist()  # the template's </s> after the user turn
    assert {s.shape[1] for s in samples} == {10}  # every conversation is longer than 10 tokens: cut
    short = UltrachatGeneral().samples(rows, tok, n_samples=8, seq_len=64, seed=42)
    assert len({s.shape[1] for s in short}) > 1  # not padded


def test_ultrachat_general_refusals():
    rows, tok = conversations(4), chat_tokenizer()
    with pytest.raises(LlmcError, match="this tokenizer has none"):
        UltrachatGeneral().samples(rows, word_tokenizer(), n_samples=2, seq_len=16, seed=0)
    with pytest.raises(LlmcError, match="needs 5, but the data has only 4"):
        UltrachatGeneral().samples(rows, tok, n_samples=5, seq_len=16, seed=0)
    with pytest.raises(LlmcError, match=r"row 2 is not a JSON list of \{\"role\", \"content\"\} messages") as exc:
        UltrachatGeneral().samples(rows[:2] + ["plain text, not a conversation"] + rows[3:], tok, n_samples=4, seq_len=16, seed=0)
    assert len(exc.value.problems) == 1


def test_ultrachat_dataset_gives_conversations_as_json_rows(tmp_path, fake_hub):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    f = tmp_path / "ultrachat.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "messages": messages}) + "\n")
    (row,) = UltraChat().load_rows(str(f), False, "calib")
    assert json.loads(row) == messages
    UltraChat().read_rows(None, True, "calib", "calib.path")
    assert fake_hub == [(("HuggingFaceH4/ultrachat_200k",), {"split": "train_sft"})]


@pytest.mark.parametrize("bs", [-1, 2])
def test_variable_length_recipes_need_bs_1_before_the_model_loads(bs, tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    from llmc_core.run import Run
    from llmc_core.testing import run_cli, run_config, write_config

    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="gptq")
    cfg["calib"].update(preproc="pileval_smooth", bs=bs)

    def no_load(self):
        raise AssertionError("the model was loaded before calib.bs was checked")

    monkeypatch.setattr(Run, "load_model", no_load)
    res = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)))
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]
    assert res.exit_code == 2 and len(errors) == 1, res.stderr
    assert errors[0].startswith(f"llmc: calib.bs: {bs} joins samples") and "pileval_smooth" in errors[0] and "calib.bs: 1" in errors[0]


def test_pileval_smooth_runs_gptq_with_samples_of_different_lengths(tiny_model_dir, tiny_text_file, tmp_path):
    from llmc_core.testing import read_results, run_cli, run_config, write_config

    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="gptq", eval_pos=["fake_quant"])
    cfg["calib"].update(preproc="pileval_smooth", bs=1, n_samples=6, seq_len=40)
    rows = Custom().load_rows(str(tiny_text_file), False, "calib")
    assert len({s.shape[1] for s in PilevalSmooth().samples(rows, word_tokenizer(), 6, 40, 0)}) > 1  # the run sees several lengths
    res = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)))
    assert res.exit_code == 0, res.stderr
    assert read_results(tmp_path / "out")


def test_real_c4_sample_and_wikitext(shared_data):
    rows = C4().load_rows(str(shared_data / "c4" / "c4-train.00000-of-01024.first1000.jsonl"), False, "calib")
    assert len(rows) == 1000
    wiki = WikiText2().load_rows(str(shared_data / "wikitext2" / "wiki.test.raw"), False, "eval")
    assert len(wiki) == 4358 and wiki[0] == "" and wiki[1].endswith("\n")


# -- download: false | true | auto ------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """Record every hub fetch instead of making it (there is no network in tests)."""
    calls = []

    def fetch(args, kwargs, field="text"):
        calls.append((args, kwargs))
        return ["hub row\n"]

    monkeypatch.setattr("llmc_plugins.data.corpora.hub_rows", fetch)
    return calls


def test_download_auto_reads_an_existing_path_and_says_so(tmp_path, fake_hub, caplog):
    (tmp_path / "wiki.test.raw").write_text("local row\n")
    with caplog.at_level("INFO", logger="llmc"):
        rows = WikiText2().read_rows(str(tmp_path), "auto", "eval", "eval.path")
    assert rows == ["local row\n"] and fake_hub == []
    assert f"reading {tmp_path} (download: auto, found locally)" in caplog.text


def test_download_auto_fetches_a_missing_path_and_says_so(tmp_path, fake_hub, caplog):
    missing = tmp_path / "nope" / "wiki.test.raw"
    with caplog.at_level("INFO", logger="llmc"):
        rows = WikiText2().read_rows(str(missing), "auto", "eval", "eval.path")
    assert rows == ["hub row\n"]
    assert fake_hub == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]
    assert "fetching the wikitext2 dataset from the hub" in caplog.text and f"{missing} does not exist" in caplog.text


def test_download_true_fetches_even_when_the_path_exists(tmp_path, fake_hub):
    (tmp_path / "c4.jsonl").write_text(json.dumps({"text": "local"}) + "\n")
    assert C4().read_rows(str(tmp_path / "c4.jsonl"), True, "calib", "calib.path") == ["hub row\n"]
    assert fake_hub[0][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}


def test_download_false_never_fetches(tmp_path, fake_hub):
    with pytest.raises(LlmcError, match="does not exist"):
        WikiText2().read_rows(str(tmp_path / "nope.raw"), False, "eval", "eval.path")
    assert fake_hub == []


def test_custom_data_has_nothing_to_fetch(tmp_path):
    with pytest.raises(LlmcError, match="no hub copy"):
        Custom().read_rows(str(tmp_path / "mine.txt"), "auto", "calib", "calib.path")


def test_a_failed_hub_fetch_is_one_line_naming_the_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub\n(long traceback text)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    from llmc_plugins.data.readers import hub_rows

    with pytest.raises(LlmcError) as exc:
        hub_rows(("allenai/c4",), {})
    (line,) = exc.value.problems
    assert "could not fetch allenai/c4 from the hub (Couldn't reach the hub)" in line and "docs/data.md" in line


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("x.jsonl", "", "holds no documents"),
        ("x.jsonl", '{"text": ""}\n{"text": "   "}\n', "holds no documents"),
        ("x.txt", "\n\n  \n", "holds no documents"),
        ("x.jsonl", b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ],
)
def test_empty_or_unreadable_calibration_file_is_reported_before_the_model_loads(name, content, expected, tiny_model_dir, tmp_path, monkeypatch):
    from llmc_core.run import Run
    from llmc_core.testing import run_cli, run_config, write_config

    calib = tmp_path / name
    calib.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = run_config(tiny_model_dir, calib, tmp_path / "out", method="awq")
    cfg["eval"]["path"] = str(calib)  # never reached

    def no_load(self):
        raise AssertionError("the model was loaded before the calibration file was checked")

    monkeypatch.setattr(Run, "load_model", no_load)
    res = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)))
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]
    assert res.exit_code == 2 and len(errors) == 1, res.stderr
    assert errors[0].startswith(f"llmc: calib.path: {calib} ") and expected in errors[0], errors[0]
    assert "Traceback" not in res.stderr
