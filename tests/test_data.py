"""Datasets and calibration preprocessors on small files."""

from __future__ import annotations

import json

import pytest

from llmc_core.errors import LlmcError
from llmc_core.testing import word_tokenizer
from llmc_plugins.data.corpora import C4, Custom, PileVal, WikiText2
from llmc_plugins.data.preprocs import PilevalAwq, RandomWindow
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
