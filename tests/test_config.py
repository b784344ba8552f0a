"""The strict config: every mistake is one clear line, exit code 2, before any model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from llmc_core import config
from llmc_core.errors import LlmcError
from llmc_core.testing import run_cli, run_config


@pytest.fixture
def cfg(tiny_model_dir, tiny_text_file, tmp_path):
    return run_config(tiny_model_dir, tiny_text_file, tmp_path / "out")


def _errors(cfg_dict) -> list[str]:
    with pytest.raises(LlmcError) as exc:
        config.validate(cfg_dict)
    return exc.value.problems


def test_valid_config_resolves_plugins(cfg):
    rc = config.validate(cfg)
    assert rc.method.name == "rtn"
    assert rc.model_family.name == "llama"
    assert rc.weight.group_size == 32
    assert [e.name for e, _ in rc.evals] == ["ppl"]


def test_names_are_case_insensitive(cfg):
    cfg["quant"]["method"] = "Rtn"
    cfg["model"]["type"] = "LLAMA"
    cfg["calib"]["name"] = "Custom"
    assert config.validate(cfg).method.name == "rtn"


@pytest.mark.parametrize(
    "section, key, fragment",
    [
        ("base", "sed", "base.sed: unknown key. Did you mean 'seed'?"),
        ("model", "torch_dtyp", "model.torch_dtyp: unknown key. Did you mean 'torch_dtype'?"),
        ("calib", "n_sample", "calib.n_sample: unknown key. Did you mean 'n_samples'?"),
        ("eval", "seq_length", "eval.seq_length: unknown key."),
        ("quant", "wieght_extra", "quant.wieght_extra: unknown key."),
        ("save", "save_fak", "save.save_fak: unknown key. Did you mean 'save_fake'?"),
    ],
)
def test_typo_in_any_section_is_one_clear_line(cfg, section, key, fragment):
    cfg[section][key] = 1
    problems = _errors(cfg)
    assert len(problems) == 1
    assert problems[0].startswith(fragment)


def test_unknown_nested_key_and_special_key(cfg):
    cfg["quant"]["weight"]["bits"] = 4
    cfg["quant"]["special"]["foo"] = True
    problems = _errors(cfg)
    assert any(p.startswith("quant.weight.bits: unknown key. Did you mean 'bit'?") for p in problems)
    assert any(p.startswith("quant.special.foo: unknown key.") for p in problems)


def test_unknown_method_lists_available_and_suggests(cfg):
    cfg["quant"]["method"] = "rtm"
    (line,) = _errors(cfg)
    assert "Unknown quant method 'rtm' at quant.method." in line
    assert "Available:" in line and "rtn" in line
    assert "Did you mean 'rtn'?" in line
    assert "'llmc plugins' lists them" in line


def test_unknown_section_and_model_type(cfg):
    cfg["sav"] = {}
    cfg["model"]["type"] = "gpt99"
    problems = _errors(cfg)
    assert any("sav: unknown section. Did you mean 'save'?" in p for p in problems)
    assert any("Unknown model type 'gpt99' at model.type" in p for p in problems)


@pytest.mark.parametrize("bit", [1, 9, "four"])
def test_bit_out_of_range_or_wrong_type(cfg, bit):
    cfg["quant"]["weight"]["bit"] = bit
    (line,) = _errors(cfg)
    assert line.startswith("quant.weight.bit:") and repr(bit) in line


def test_per_group_needs_group_size(cfg):
    del cfg["quant"]["weight"]["group_size"]
    (line,) = _errors(cfg)
    assert "quant.weight" in line and "group_size" in line


def test_bad_eval_position(cfg):
    cfg["eval"]["eval_pos"] = ["pretrain", "fakequant"]
    (line,) = _errors(cfg)
    assert line.startswith("eval.eval_pos.1:") and "'fake_quant'" in line


def test_fake_quant_position_needs_quant_section(cfg):
    del cfg["quant"]
    (line,) = _errors(cfg)
    assert "needs a quant section" in line


def test_quant_out_refuses_transformed_only_for_methods_with_a_block_pass(cfg):
    cfg["quant"]["quant_out"] = True
    cfg["eval"]["eval_pos"] = ["transformed", "fake_quant"]
    config.validate(cfg)  # RTN has no block pass: transformed is the float model, measurable
    cfg["quant"]["method"] = "GPTQ"
    (line,) = _errors(cfg)
    assert line.startswith("quant.quant_out: true quantizes blocks during calibration")


def test_missing_files_are_named(cfg, tmp_path):
    cfg["model"]["path"] = str(tmp_path / "nope")
    cfg["calib"]["path"] = str(tmp_path / "missing.txt")
    problems = _errors(cfg)
    assert any(p.startswith("model.path:") and "does not exist" in p for p in problems)
    assert any(p.startswith("calib.path:") and "download: auto" in p and "docs/data.md" in p for p in problems)


def test_existing_output_folder_is_refused_unless_overwrite(cfg, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (line,) = _errors(cfg)
    assert "already exists" in line and "save.overwrite: true" in line
    cfg["save"]["overwrite"] = True
    config.validate(cfg)


def test_eval_may_be_a_list(cfg, tiny_text_file):
    second = dict(cfg["eval"], seq_len=32)
    cfg["eval"] = [cfg["eval"], second]
    rc = config.validate(cfg)
    assert [o.seq_len for _, o in rc.evals] == [64, 32]
    cfg["eval"][1]["bs"] = 0
    (line,) = _errors(cfg)
    assert line.startswith("eval.1.bs:")


def test_env_vars_with_defaults_are_expanded(cfg, tiny_text_file, monkeypatch):
    cfg["calib"]["path"] = "${LLMC_TEST_DATA:-" + str(tiny_text_file) + "}"
    assert config.validate(cfg).calib.path == str(tiny_text_file)
    monkeypatch.setenv("LLMC_TEST_DATA", "/definitely/not/here.txt")
    (line,) = _errors(cfg)
    assert "/definitely/not/here.txt does not exist" in line


def test_unset_env_var_without_default(cfg):
    cfg["calib"]["path"] = "${LLMC_SURELY_UNSET_VAR}/x.txt"
    (line,) = _errors(cfg)
    assert "LLMC_SURELY_UNSET_VAR is not set" in line


def test_pkg_path_names_missing_package(cfg):
    cfg["model"]["path"] = "pkg:no_such_pkg_xyz/model.gguf"
    (line,) = _errors(cfg)
    assert "package 'no_such_pkg_xyz' is not installed" in line


def test_overrides(cfg, write_yaml):
    path = write_yaml(cfg)
    rc = config.load(path, ["eval.num_samples=3", "quant.weight.bit=3", "save.save_path=/tmp/llmc-override-test"])
    assert rc.evals[0][1].num_samples == 3
    assert rc.weight.bit == 3
    assert str(rc.save_path) == "/tmp/llmc-override-test"
    with pytest.raises(LlmcError, match="not of the form"):
        config.load(path, ["eval.num_samples"])


def test_cli_yaml_syntax_error_is_reported_as_such(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("model:\n  type: llama\n   path: x\n")
    res = run_cli("validate", str(bad))
    assert res.exit_code == 2
    assert "YAML syntax error" in res.stderr and "bad.yml:3" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_typo_fails_fast_with_exit_code_2(cfg, write_yaml):
    """Fast because nothing heavy happens before validation: in a fresh interpreter the error comes
    back without torch ever being imported (so no model was loaded either)."""
    cfg["calib"]["seq_lenn"] = 512
    path = write_yaml(cfg)
    code = f"import sys; from llmc_core.cli import main; code = main(['run', {str(path)!r}]); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("llmc:")]
    assert lines == [line for line in res.stderr.splitlines() if line.strip()]  # nothing but the error line
    assert len(lines) == 1 and "calib.seq_lenn" in lines[0]


def test_cli_missing_config_file(tmp_path):
    res = run_cli("validate", str(tmp_path / "none.yml"))
    assert res.exit_code == 2 and "Config file not found" in res.stderr


def test_modeltc_seed_config_shape_validates(tiny_model_dir, tiny_text_file, tmp_path):
    text = f"""
base:
    seed: &seed 42
model:
    type: Llama
    path: {tiny_model_dir}
    tokenizer_mode: slow
    torch_dtype: auto
calib:
    name: pileval
    download: False
    path: {tiny_text_file}
    n_samples: 128
    bs: -1
    seq_len: 512
    preproc: pileval_awq
    seed: *seed
eval:
    eval_pos: [pretrain, fake_quant]
    name: wikitext2
    download: False
    path: {tiny_text_file}
    seq_len: 2048
    bs: 1
    inference_per_block: False
quant:
    method: RTN
    weight:
        bit: 4
        symmetric: False
        granularity: per_group
        group_size: 128
    special: {{}}
save:
    save_trans: False
    save_fake: False
    save_path: {tmp_path / "save"}
"""
    rc = config.validate(yaml.safe_load(text))
    assert rc.calib.n_samples == 128 and rc.weight.group_size == 128


def test_download_auto_without_the_datasets_package_is_refused_before_loading(cfg, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    cfg["calib"].update(path=str(tmp_path / "missing.txt"), download="auto")
    (line,) = _errors(cfg)
    assert line.startswith("calib.download:") and "does not exist, so download: auto" in line and "pip install datasets" in line
    cfg["calib"]["path"] = str(tmp_path)  # found locally: nothing to fetch, nothing to install
    config.validate(cfg)


def test_download_takes_only_false_true_or_auto(cfg):
    cfg["calib"]["download"] = "sometimes"
    (line,) = _errors(cfg)
    assert line.startswith("calib.download:")
