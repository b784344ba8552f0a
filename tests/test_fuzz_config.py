"""Bad input, tried systematically: hypothesis breaks a valid tiny-model config in many ways and
every case must end in clean error lines (one per problem, each starting with ``llmc:``), exit
code 2 and no traceback, through ``llmc run`` in-process.

Validation-level breakage (wrong types, unknown keys and sections, out-of-range values, unknown
names, missing keys and files, bad overrides, broken YAML) never loads a model. Breakage that only
shows once the model or the data is read (empty or unreadable calibration/evaluation data,
``n_samples`` larger than the data gives, a group size that does not divide the layers, a model
folder that is not one) runs on the tiny Llama. ``LLMC_FUZZ_EXAMPLES`` scales both counts.
"""

from __future__ import annotations

import itertools
import os
import sys
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmc_core import hookimpl
from llmc_core.api import Method, NoOptions
from llmc_core.testing import registered, run_cli, run_config, save_tiny_llama, write_corpus

SCALE = float(os.environ.get("LLMC_FUZZ_EXAMPLES", "1"))
VALIDATION_EXAMPLES = int(200 * SCALE)
MODEL_EXAMPLES = int(30 * SCALE)
COUNTS = {"validation": 0, "model": 0}
_ids = itertools.count()


class CalibNoop(Method):
    """Test method: needs calibration data, changes nothing before RTN."""

    name = "calib_noop_fuzz"
    Config = NoOptions
    needs_calibration = True


plugin = types.ModuleType("fuzz_calib_plugin")
plugin.llmc_register_methods = hookimpl(lambda register: register(CalibNoop))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, a corpus, broken data files, and the calibration method, for the whole module."""
    root = tmp_path_factory.mktemp("fuzz")
    files = {
        "model": save_tiny_llama(root / "model"),
        "corpus": write_corpus(root / "corpus.txt"),
        "empty": root / "empty.txt",
        "blank": root / "blank.txt",
        "binary": root / "binary.txt",
        "badjson": root / "bad.jsonl",
        "notjson": root / "latin1.jsonl",
        "folder": root / "a_folder",
        "not_a_model": root / "not_a_model",
        "short": root / "short.txt",
    }
    files["empty"].write_text("", encoding="utf-8")
    files["blank"].write_text("\n   \n\n", encoding="utf-8")
    files["binary"].write_bytes(bytes(range(256)) * 8)
    files["badjson"].write_text('{"text": "fine"}\n{not json}\n', encoding="utf-8")
    files["notjson"].write_bytes(b'{"text": "caf\xe9"}\n')
    files["folder"].mkdir()
    files["not_a_model"].mkdir()
    (files["not_a_model"] / "config.json").write_text("{not json", encoding="utf-8")
    files["short"].write_text("the quick brown fox\n", encoding="utf-8")
    with registered(plugin, name="test:fuzz_calib_plugin"):
        yield root, files
    print(f"\nfuzz cases run: {COUNTS['validation']} validation-level, {COUNTS['model']} model-level", file=sys.__stderr__)


def _base(root: Path, files: dict, method: str = "rtn") -> dict:
    out = root / f"out{next(_ids)}"
    cfg = run_config(files["model"], files["corpus"], out, method=method)
    cfg["eval"]["num_samples"] = 1
    return cfg


def _check(res, max_problems: int) -> None:
    assert res.exit_code == 2, (res.exit_code, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]
    # everything else on stderr is a timestamped log line
    others = [ln for ln in res.stderr.splitlines() if ln and not ln.startswith("llmc:") and ln[2:3] != ":"]
    assert not others, res.stderr
    assert 1 <= len(errors) <= max_problems, res.stderr
    assert all(len(e) < 600 for e in errors), errors


def _run(root: Path, cfg: dict | str, *args: str):
    path = root / f"cfg{next(_ids)}.yml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return run_cli("run", str(path), *args)


# ---------------------------------------------------------------------------------------------
# validation-level breakage
# ---------------------------------------------------------------------------------------------

INT_KEYS = [("base", "seed"), ("calib", "n_samples"), ("calib", "bs"), ("calib", "seq_len"), ("eval", "seq_len"), ("eval", "bs"), ("eval", "num_samples"), ("quant.weight", "bit"), ("quant.weight", "group_size")]
BOOL_KEYS = [("calib", "download"), ("eval", "download"), ("quant.weight", "symmetric"), ("quant", "quant_out"), ("save", "overwrite"), ("save", "save_fake"), ("save", "checkpoint_blocks"), ("model", "trust_remote_code")]
STR_KEYS = [("model", "type"), ("model", "path"), ("calib", "name"), ("calib", "path"), ("calib", "preproc"), ("eval", "name"), ("eval", "path"), ("quant", "method"), ("save", "save_path"), ("base", "device"), ("model", "torch_dtype"), ("quant.weight", "granularity")]
REQUIRED = [("model", "type"), ("model", "path"), ("calib", "name"), ("eval", "name"), ("quant", "method"), ("quant", "weight"), ("quant.weight", "bit"), ("save", "save_path")]
SECTIONS = ["base", "model", "calib", "eval", "quant", "save", "quant.weight"]
NAME_KEYS = [("model", "type"), ("calib", "name"), ("calib", "preproc"), ("eval", "name"), ("eval", "type"), ("quant", "method")]
PATH_KEYS = [("model", "path"), ("calib", "path"), ("eval", "path")]

not_a_number = st.text(alphabet="abcxyz-_ ", min_size=1, max_size=8).filter(lambda s: s.strip() not in ("", "-"))
not_an_int = st.one_of(not_a_number, st.lists(st.integers(), min_size=1, max_size=3), st.dictionaries(st.just("k"), st.integers(), min_size=1), st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)))
not_a_bool = st.one_of(st.text(alphabet="qxz", min_size=2, max_size=6), st.integers(min_value=2, max_value=99), st.lists(st.booleans(), min_size=1, max_size=2), st.dictionaries(st.just("k"), st.booleans(), min_size=1))
not_a_str = st.one_of(st.integers(), st.lists(st.text(max_size=3), min_size=1, max_size=2), st.dictionaries(st.just("k"), st.integers(), min_size=1))
bad_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).map(lambda s: "zz" + s)
unknown_key = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).map(lambda s: "qq_" + s)


def _section(cfg: dict, dotted: str) -> dict | None:
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None  # an earlier breakage removed or replaced it


@st.composite
def breakage(draw):
    """One way to break the config: ``(kind, key, mutate(cfg))``."""
    kind = draw(st.sampled_from(["int", "bool", "str", "range", "unknown_key", "unknown_section", "not_mapping", "missing", "name", "path"]))
    if kind == "int":
        sec, key = draw(st.sampled_from(INT_KEYS))
        value = draw(not_an_int)
    elif kind == "bool":
        sec, key = draw(st.sampled_from(BOOL_KEYS))
        value = draw(not_a_bool)
    elif kind == "str":
        sec, key = draw(st.sampled_from(STR_KEYS))
        value = draw(not_a_str)
    elif kind == "range":
        sec, key, value = draw(
            st.one_of(
                st.tuples(st.just("quant.weight"), st.just("bit"), st.one_of(st.integers(max_value=1), st.integers(min_value=9))),
                st.tuples(st.just("quant.weight"), st.just("group_size"), st.integers(max_value=0)),
                st.tuples(st.sampled_from(["calib", "eval"]), st.just("seq_len"), st.integers(max_value=0)),
                st.tuples(st.just("calib"), st.just("n_samples"), st.integers(max_value=0)),
                st.tuples(st.just("calib"), st.just("bs"), st.integers(max_value=-2)),
                st.tuples(st.just("eval"), st.sampled_from(["bs", "num_samples"]), st.integers(max_value=0)),
                st.tuples(st.just("eval"), st.just("eval_pos"), st.lists(st.sampled_from(["pretrian", "fake", "quant", "end"]), min_size=1, max_size=1)),
                st.tuples(st.just("base"), st.just("device"), st.sampled_from(["gpu", "cuda:x", "tpu", "CPU0"])),
            )
        )
    elif kind == "unknown_key":
        sec, key, value = draw(st.sampled_from(SECTIONS)), draw(unknown_key), draw(st.integers())
    elif kind == "unknown_section":
        sec, key, value = "", draw(unknown_key), {}
    elif kind == "not_mapping":
        sec, key, value = "", draw(st.sampled_from(["base", "model", "calib", "eval", "quant", "save"])), draw(st.one_of(st.integers(), st.text(alphabet="abc", min_size=1, max_size=4)))
    elif kind == "missing":
        sec, key = draw(st.sampled_from(REQUIRED))
        value = None
    elif kind == "name":
        sec, key = draw(st.sampled_from(NAME_KEYS))
        value = draw(bad_name)
    else:
        sec, key = draw(st.sampled_from(PATH_KEYS))
        value = "/nonexistent/llmc-fuzz/" + draw(st.text(alphabet="abc", min_size=1, max_size=6))

    def mutate(cfg: dict) -> None:
        node = _section(cfg, sec) if sec else cfg
        if node is None:
            return
        if kind == "missing":
            node.pop(key, None)
        else:
            node[key] = value

    return kind, f"{sec}.{key}", mutate


@settings(max_examples=VALIDATION_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(breaks=st.lists(breakage(), min_size=1, max_size=3, unique_by=lambda b: b[1]))
def test_broken_config_is_one_clean_line_per_problem(world, breaks):
    root, files = world
    cfg = _base(root, files)
    for _, _, mutate in breaks:
        mutate(cfg)
    COUNTS["validation"] += 1
    _check(_run(root, cfg, "-q"), max_problems=len(breaks))


@settings(max_examples=max(10, VALIDATION_EXAMPLES // 10), deadline=None, derandomize=True)
@given(garbage=st.sampled_from(["model: [unclosed", "a: b: c", "\tbase: {}", "model:\n  type: llama\n path: x", "- just\n- a list", "'unterminated", "42", "{", "base: {seed: }}"]), override=st.sampled_from([None, "noequals", "=3", "eval.num_samples"]))
def test_broken_yaml_and_overrides(world, garbage, override):
    root, files = world
    COUNTS["validation"] += 1
    _check(_run(root, garbage), max_problems=1)
    if override is not None:
        COUNTS["validation"] += 1
        _check(_run(root, _base(root, files), override), max_problems=1)


# ---------------------------------------------------------------------------------------------
# breakage that shows once the model or the data is read (tiny model)
# ---------------------------------------------------------------------------------------------


@st.composite
def model_breakage(draw):
    kind = draw(st.sampled_from(["calib_data", "eval_data", "n_samples", "group_size", "model_folder"]))
    if kind == "calib_data":
        return kind, ("calib", "path", draw(st.sampled_from(["empty", "blank", "binary", "badjson", "notjson", "folder", "short"])))
    if kind == "eval_data":
        return kind, ("eval", "path", draw(st.sampled_from(["empty", "blank", "binary", "badjson", "notjson", "folder", "short"])))
    if kind == "n_samples":
        return kind, ("calib", "n_samples", draw(st.integers(min_value=10_000, max_value=10**7)))
    if kind == "group_size":
        return kind, ("quant.weight", "group_size", draw(st.sampled_from([3, 5, 7, 12, 24, 48, 96, 100])))
    return kind, ("model", "path", draw(st.sampled_from(["folder", "not_a_model", "corpus"])))


@settings(max_examples=MODEL_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=model_breakage(), preproc=st.sampled_from(["pileval_awq", "random_window"]))
def test_broken_data_or_model_is_one_clean_line(world, case, preproc):
    root, files = world
    kind, (sec, key, value) = case
    cfg = _base(root, files, method="calib_noop_fuzz")
    cfg["calib"]["preproc"] = "pileval_awq" if kind == "n_samples" else preproc  # random_window samples with replacement
    if kind == "eval_data":
        cfg["eval"]["eval_pos"] = ["pretrain"]
    else:  # fail at the calibration or model step without spending time on an evaluation first
        cfg["eval"]["eval_pos"] = ["fake_quant"]
    _section(cfg, sec)[key] = str(files[value]) if isinstance(value, str) else value
    COUNTS["model"] += 1
    _check(_run(root, cfg, "-q"), max_problems=1)
