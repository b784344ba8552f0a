"""Hostile or careless config input (issue 32, items 6, 7, 8 and 12): each is one line at
``llmc validate``, before any model loads, never a run that fails after the work or a value
coerced silently."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from llmc_core import config
from llmc_core.errors import LlmcError
from llmc_core.testing import run_cli, run_config, write_config


@pytest.fixture
def cfg(tiny_model_dir, tiny_text_file, tmp_path):
    return run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="gptq")


def _one_line(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("llmc:")]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def _validate(cfg, tmp_path, *overrides: str) -> str:
    return _one_line(run_cli("validate", str(write_config(tmp_path / "cfg.yml", cfg)), *overrides))


# -- item 6: what would fail after loading, evaluating or calibrating fails at validate ----------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("calib.bs=0", "calib.bs: should be -1 (all samples in one batch) or a batch size of 1 or more"),
        (f"base.seed={2**64}", "base.seed: Input should be less than 18446744073709551616"),
        (f"base.seed={-(2**63) - 1}", "base.seed: Input should be greater than or equal to"),
    ],
)
def test_settings_a_run_cannot_use_fail_at_validate(cfg, tmp_path, override, expected):
    assert _validate(cfg, tmp_path, override).startswith(f"llmc: {expected}")


@pytest.mark.parametrize("device, visible, expected", [("cuda", 0, "no CUDA device is available here"), ("cuda:3", 1, "this machine has 1 CUDA device (cuda:0)"), ("cuda:2", 2, "has 2 CUDA devices (cuda:0..cuda:1)")])
def test_a_cuda_device_the_machine_lacks_fails_at_validate(cfg, tmp_path, monkeypatch, device, visible, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    cfg["base"]["device"] = device
    line = _validate(cfg, tmp_path)
    assert line.startswith(f"llmc: base.device: {device}, but") and expected in line
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config.validate(cfg)  # the same device where there is one


def test_a_save_path_under_a_file_fails_at_validate(cfg, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    cfg["save"]["save_path"] = str(tmp_path / "notes.txt" / "run" / "out")
    line = _validate(cfg, tmp_path)
    assert line == f"llmc: save.save_path: {tmp_path}/notes.txt/run/out is under {tmp_path}/notes.txt, which is a file. Choose a folder path."


def test_a_read_only_save_path_fails_at_validate(cfg):
    """As a user without write permission (root is not bound by permission bits, so the check runs
    in a child that drops to 'nobody' when the tests run as root, on files it may read)."""
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="llmc-ro-"))
    try:
        shared.chmod(0o755)
        (shared / "model").mkdir()
        (shared / "corpus.txt").write_text("some words\n")
        locked = shared / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        cfg["model"]["path"] = str(shared / "model")
        cfg["calib"]["path"] = cfg["eval"]["path"] = str(shared / "corpus.txt")
        cfg["save"]["save_path"] = str(locked / "out")
        problems = _validate_as_nobody(cfg)
    finally:
        shutil.rmtree(shared)
    assert problems == [f"save.save_path: {locked}/out cannot be written: {locked} is read-only for this user. Choose a writable folder."]


def _validate_as_nobody(cfg) -> list[str]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: validate as an unprivileged user, send the problems back
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                config.validate(cfg)
                problems = []
            except LlmcError as exc:
                problems = exc.problems
            os.write(write, "\n".join(problems).encode())
        except BaseException as exc:  # noqa: BLE001 (reported to the parent, which fails)
            os.write(write, f"child raised {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        problems = fh.read().splitlines()
    os.waitpid(pid, 0)
    return problems


# -- item 7: duplicate keys ------------------------------------------------------------------------


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(cfg, tmp_path):
    text = write_config(tmp_path / "cfg.yml", cfg).read_text()
    (tmp_path / "twice.yml").write_text(text + "quant:\n  method: awq\n")
    line = _one_line(run_cli("validate", str(tmp_path / "twice.yml")))
    first = 1 + text.splitlines().index("quant:")
    last = len(text.splitlines()) + 1
    assert line.startswith(f"llmc: YAML syntax error: {tmp_path}/twice.yml:{last}:1: duplicate key 'quant' (lines {first} and {last})")
    (tmp_path / "flow.yml").write_text(text.replace("  weight:\n", "  weight: {bit: 4, bit: 3, granularity: per_channel}\n  old_weight:\n"))
    line = _one_line(run_cli("validate", str(tmp_path / "flow.yml")))
    assert "duplicate key 'bit' (twice on line" in line
    res = run_cli("validate", str(tmp_path / "cfg.yml"), "quant.weight={bit: 4, bit: 3}")
    assert "Override 'quant.weight={bit: 4, bit: 3}': duplicate key 'bit'" in _one_line(res)


def test_a_merge_key_is_not_a_duplicate(cfg, tmp_path):
    text = write_config(tmp_path / "cfg.yml", cfg).read_text()
    weight = "  weight:\n    bit: 4\n    symmetric: false\n    granularity: per_group\n    group_size: 32\n"
    assert weight in text
    text = "defaults: &w {bit: 8, granularity: per_group, group_size: 32}\n" + text.replace(weight, "  weight:\n    <<: *w\n    bit: 4\n")
    (tmp_path / "merge.yml").write_text(text)
    data = config.read_yaml(tmp_path / "merge.yml")
    del data["defaults"]
    assert config.validate(data).weight.bit == 4


# -- item 8: an alias bomb -------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [6, 9])
def test_an_alias_bomb_is_refused_in_well_under_a_second(tmp_path, levels):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    path = tmp_path / "bomb.yml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 500
    start = time.perf_counter()
    line = _one_line(run_cli("validate", str(path)))
    assert time.perf_counter() - start < 1.0
    assert line == f"llmc: {path}: its aliases expand to more than 100,000 values (an alias bomb?); a config has hundreds. Write the values out instead."


def test_an_alias_loop_is_refused(tmp_path):
    path = tmp_path / "loop.yml"
    path.write_text("base: &a {seed: [*a]}\n")
    assert "an alias refers to a section that contains it" in _one_line(run_cli("validate", str(path)))


# -- item 12 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_save_path_is_refused(cfg, tmp_path, value):
    cfg["save"]["save_path"] = value
    assert _validate(cfg, tmp_path).startswith("llmc: save.save_path: is empty; give the folder to write into")


def test_a_mistyped_relative_model_path_fails_fast_when_the_hub_cannot_be_reached(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    cfg["model"]["path"] = "w/modle"
    with socket.socket() as closed:  # a port nothing listens on: connection refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    line = _validate(cfg, tmp_path)
    assert time.perf_counter() - start < 5
    assert line.startswith(f"llmc: model.path: w/modle is not a local path (not found from {tmp_path}), and as a hub id it cannot be fetched: 127.0.0.1 is not reachable")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "is not in the Hugging Face cache while HF_HUB_OFFLINE is set" in _validate(cfg, tmp_path)


def test_a_hub_id_that_can_be_fetched_is_named_at_validate(cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    cfg["model"]["path"] = "org/model"
    with socket.socket() as hub:  # something listens where the hub is said to be
        hub.bind(("127.0.0.1", 0))
        hub.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        with caplog.at_level("WARNING", logger="llmc"):
            config.validate(cfg)
    assert "model.path: org/model not found locally; treating it as a Hugging Face hub id" in caplog.text


def test_group_size_minus_one_means_no_groups(cfg):
    cfg["quant"]["weight"].update(granularity="per_channel", group_size=-1)
    weight = config.validate(cfg).weight
    assert weight.granularity == "per_channel" and weight.group_size in (None, -1)
    assert weight.describe() == "w4 per_channel asym"
    cfg["quant"]["weight"]["granularity"] = "per_group"
    with pytest.raises(LlmcError) as exc:
        config.validate(cfg)
    assert [line.split(":")[0] for line in exc.value.problems] in (["quant.weight.group_size"], ["quant.weight"])


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("quant.weight", "group_size", "32", "Input should be a valid integer (got '32')"),
        ("quant.weight", "bit", 4.0, "Input should be a valid integer (got 4.0)"),
        ("quant.weight", "symmetric", "yes", "Input should be a valid boolean (got 'yes')"),
        ("calib", "n_samples", "128", "Input should be a valid integer (got '128')"),
        ("eval", "seq_len", 64.0, "Input should be a valid integer (got 64.0)"),
        ("save", "overwrite", "yes", "Input should be a valid boolean (got 'yes')"),
        ("quant.special", "percdamp", "0.01", "Input should be a valid number (got '0.01')"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(cfg, section, key, value, expected):
    node = cfg
    for part in section.split("."):
        node = node[part]
    node[key] = value
    with pytest.raises(LlmcError) as exc:
        config.validate(cfg)
    (line,) = exc.value.problems  # one line, also where the field takes several types (int | str)
    head, _, tail = expected.partition(" (got ")
    assert line.startswith(f"{section}.{key}: {head}") and line.endswith(f" (got {tail}"), line


def test_a_value_that_fits_no_member_of_a_union_is_one_line():
    """Strict ``int | str`` (as ``quant.weight.bit`` takes float format names) given 4.0 fails each
    member; pydantic reports ``bit.int`` and ``bit.str``, the user reads one line."""
    from typing import Literal

    from llmc_core.schema import StrictModel

    class Section(StrictModel):
        bit: int | str
        mode: list[Literal["a", "b"]] = []
        name: str

    problems = config._Problems()
    problems.validate(Section, {"bit": 4.0, "mode": ["a", "c"]}, "quant.weight")
    problems.validate(Section, {"bit": [4], "name": 5}, "other")
    problems.validate(Section, {"bit": {"x": 1}, "name": "n"}, "third")
    assert problems.lines == [
        "quant.weight.bit: Input should be a valid integer or a valid string (got 4.0)",
        "quant.weight.mode.1: Input should be 'a' or 'b' (got 'c')",
        "quant.weight.name: required key is missing.",
        "other.bit: Input should be a valid integer or a valid string (got [4])",
        "other.name: Input should be a valid string (got 5)",
        "third.bit: Input should be a valid integer or a valid string",
    ]


def test_modeltc_typed_values_stay_valid(cfg):
    """ModelTC/llmc's configs write ints for floats and YAML booleans: still valid."""
    cfg["quant"]["special"] = {"percdamp": 1, "actorder": True, "blocksize": 128, "static_groups": False}
    cfg["quant"]["weight"].update(bit=4, symmetric=False)
    assert config.validate(cfg).special.percdamp == 1.0
