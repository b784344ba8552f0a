"""The ``opencompass`` step: validation, the generated OpenCompass config, result reading, and
that OpenCompass evaluates exactly the fake-quant weights.

Most tests run without OpenCompass (the driver's config editing works on plain dicts; the run is
checked with the OpenCompass subprocess replaced). Tests that run OpenCompass use the Python that
has it: this one when ``import opencompass`` works here, else ``$LLMC_OC_PYTHON``; they skip with
the install command when there is none.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmc_core.config import validate
from llmc_core.errors import LlmcError
from llmc_core.testing import run_config, save_tiny_llama
from llmc_plugins.evaluators.opencompass import checks, runner

pytestmark = pytest.mark.opencompass

ROOT = Path(__file__).resolve().parents[1]
SIDE = ROOT / "src" / "llmc_plugins" / "evaluators" / "opencompass" / "oc_side"
HUMANEVAL = Path(os.environ.get("LLMC_DATA", ROOT.parent / "shared" / "data")) / "humaneval" / "human-eval-v2-20210705.jsonl"


def _driver():
    spec = importlib.util.spec_from_file_location("llmc_oc_driver", SIDE / "llmc_oc_driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


driver = _driver()


def oc_python() -> str:
    """The Python that has OpenCompass, or skip."""
    if all(importlib.util.find_spec(m) for m in checks.NEEDED):
        return sys.executable
    other = os.environ.get("LLMC_OC_PYTHON")
    if other and not checks.install_problems(other):
        return other
    pytest.skip(f"OpenCompass not installed here and LLMC_OC_PYTHON unset: {checks.INSTALL}")


def oc_config(**model) -> dict:
    """A loaded OpenCompass config as the driver sees it (types as strings, as in a dumped config)."""
    entry = {"type": "opencompass.models.huggingface_above_v4_33.HuggingFaceBaseModel", "abbr": "llmc", "max_out_len": 16, "batch_size": 2, "run_cfg": {"num_gpus": 1}}
    entry.update(model)
    dataset = {
        "abbr": "openai_humaneval",
        "type": "opencompass.datasets.HumanevalDataset",
        "path": "opencompass/humaneval",
        "reader_cfg": {"input_columns": ["prompt"], "output_column": "task_id"},
        "eval_cfg": {"evaluator": {"type": "opencompass.datasets.humaneval.HumanEvalEvaluator"}},
    }
    return {"models": [entry], "datasets": [dataset]}


def settings(**kw) -> dict:
    base = {"models": [{"mode": "fake_quant", "path": "/m/fake"}], "max_num_workers": 2, "visible_gpus": 0, "num_gpus": None, "test_range": None}
    base.update(kw)
    return base


# ---------------------------------------------------------------------------------------------
# the generated OpenCompass config (driver, plain dicts)
# ---------------------------------------------------------------------------------------------


def test_model_folder_injected_as_path_and_tokenizer_path_per_mode():
    cfg = oc_config()
    notes = driver.prepare(cfg, settings(models=[{"mode": "pretrain", "path": "/m/pre"}, {"mode": "fake_quant", "path": "/m/fake"}]))
    assert [(m["abbr"], m["path"], m["tokenizer_path"]) for m in cfg["models"]] == [
        ("llmc-pretrain", "/m/pre", "/m/pre"),
        ("llmc-fake_quant", "/m/fake", "/m/fake"),
    ]
    assert [m["mode"] for m in notes["models"]] == ["pretrain", "fake_quant"]
    # the transformers-5 compatible classes replace OpenCompass's
    assert cfg["models"][0]["type"] == "llmc_oc_compat.HuggingFaceBaseModel"
    assert cfg["datasets"][0]["eval_cfg"]["evaluator"]["type"] == "llmc_oc_compat.HumanEvalEvaluator"


def test_path_in_a_model_entry_is_rejected_with_the_reason():
    with pytest.raises(driver.ConfigProblem, match="injects that folder as path"):
        driver.prepare(oc_config(path="/somewhere/else"), settings())


@pytest.mark.parametrize(
    ("visible", "asked", "override", "expected"),
    [(0, 1, None, 0), (8, 1, None, 1), (8, 4, None, 4), (2, 4, None, 2), (8, 1, 4, 4), (0, 4, 2, 0)],
)
def test_num_gpus_clamped_to_visible_gpus(visible, asked, override, expected):
    cfg = oc_config(run_cfg={"num_gpus": asked})
    notes = driver.prepare(cfg, settings(visible_gpus=visible, num_gpus=override))
    assert cfg["models"][0]["run_cfg"]["num_gpus"] == expected
    assert notes["models"][0]["num_gpus"] == expected
    assert bool(notes["warnings"]) == (0 < visible < (override or asked))


def test_workers_set_on_partitioner_and_both_runners():
    cfg = oc_config()
    driver.prepare(cfg, settings(max_num_workers=8))
    part, runner_cfg = cfg["infer"]["partitioner"], cfg["infer"]["runner"]
    assert part["type"].endswith("NumWorkerPartitioner") and part["num_worker"] == 8
    assert part["min_task_size"] == 1  # small subsets are still split into one shard per worker
    assert runner_cfg["type"].endswith("LocalRunner") and runner_cfg["max_num_workers"] == 8
    assert cfg["eval"]["runner"]["max_num_workers"] == 8


def test_runner_type_from_the_config_passes_through():
    cfg = oc_config()
    cfg["infer"] = {
        "partitioner": {"type": "opencompass.partitioners.NumWorkerPartitioner", "num_worker": 1, "num_split": 1},
        "runner": {"type": "opencompass.runners.SlurmRunner", "partition": "gpu", "max_num_workers": 1, "task": {"type": "x.Task"}},
    }
    driver.prepare(cfg, settings(max_num_workers=4))
    assert cfg["infer"]["runner"] == {"type": "opencompass.runners.SlurmRunner", "partition": "gpu", "max_num_workers": 4, "task": {"type": "x.Task"}}
    assert cfg["infer"]["partitioner"]["num_worker"] == 4 and "num_split" not in cfg["infer"]["partitioner"]


def test_test_range_applies_to_every_dataset():
    cfg = oc_config()
    cfg["datasets"].append(copy.deepcopy(cfg["datasets"][0]) | {"abbr": "other"})
    driver.prepare(cfg, settings(test_range="[0:4]"))
    assert [d["reader_cfg"]["test_range"] for d in cfg["datasets"]] == ["[0:4]", "[0:4]"]


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_llmcs_in_model_and_tokenizer_kwargs(trust):
    cfg = oc_config(model_kwargs={"device_map": "cpu"})
    driver.prepare(cfg, settings(trust_remote_code=trust))
    (model,) = cfg["models"]
    # OpenCompass's defaults are trust_remote_code=True for both; llmc's value replaces them
    assert model["model_kwargs"] == {"device_map": "cpu", "trust_remote_code": trust}
    assert model["tokenizer_kwargs"] == {"trust_remote_code": trust}


def test_trust_remote_code_is_off_when_llmc_says_nothing():
    cfg = oc_config()
    driver.prepare(cfg, {k: v for k, v in settings().items() if k != "trust_remote_code"})
    assert cfg["models"][0]["model_kwargs"]["trust_remote_code"] is False
    assert cfg["models"][0]["tokenizer_kwargs"]["trust_remote_code"] is False


def test_trust_remote_code_in_the_opencompass_config_is_refused_when_llmc_has_it_off():
    with pytest.raises(driver.ConfigProblem, match="set model.trust_remote_code in the llmc config"):
        driver.prepare(oc_config(tokenizer_kwargs={"trust_remote_code": True}), settings(trust_remote_code=False))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("HuggingFacewithChatTemplate", "llmc_oc_compat.HuggingFacewithChatTemplate"),  # registry name
        ("HuggingFaceBaseModel", "llmc_oc_compat.HuggingFaceBaseModel"),
        ("opencompass.models.HuggingFacewithChatTemplate", "llmc_oc_compat.HuggingFacewithChatTemplate"),
        ("llmc_oc_compat.HuggingFaceBaseModel", "llmc_oc_compat.HuggingFaceBaseModel"),
        ("LlmcHuggingFaceBaseModel", "llmc_oc_compat.HuggingFaceBaseModel"),
    ],
)
def test_model_type_names_get_the_fingerprinting_class(given, expected):
    cfg = oc_config(type=given)
    driver.prepare(cfg, settings())
    assert cfg["models"][0]["type"] == expected


@pytest.mark.parametrize("given", ["mypkg.models.MyHF", "opencompass.models.VLLM", "opencompass.models.HuggingFace", "VLLM", None])
def test_model_types_llmc_cannot_check_are_refused(given):
    with pytest.raises(driver.ConfigProblem, match="Use type=HuggingFaceBaseModel or type=HuggingFacewithChatTemplate"):
        driver.prepare(oc_config(type=given), settings())


def test_registry_name_of_the_humaneval_evaluator_is_swapped_and_gets_the_timeout():
    cfg = oc_config()
    cfg["datasets"][0]["eval_cfg"]["evaluator"]["type"] = "HumanEvalEvaluator"
    driver.prepare(cfg, settings(humaneval_timeout=7.5))
    assert cfg["datasets"][0]["eval_cfg"]["evaluator"] == {"type": "llmc_oc_compat.HumanEvalEvaluator", "timeout": 7.5}


@pytest.mark.parametrize("partitioner", ["opencompass.partitioners.SizePartitioner", "NaivePartitioner", "mypkg.NumWorkerPartitioner"])
def test_a_partitioner_that_does_not_give_one_shard_per_worker_is_refused(partitioner):
    cfg = oc_config()
    cfg["infer"] = {"partitioner": {"type": partitioner, "max_task_size": 2000}}
    with pytest.raises(driver.ConfigProblem, match="Remove infer.partitioner"):
        driver.prepare(cfg, settings(max_num_workers=4))


@pytest.mark.parametrize(
    ("size", "workers", "min_task_size", "shards"),
    [(4, 2, 1, 2), (164, 8, 1, 8), (9, 4, 1, 3), (3, 4, 1, 3), (4, 2, 16, 1), (40, 4, 16, 3), (1, 1, 1, 1)],
)
def test_shard_count_follows_numworkerpartitioner(size, workers, min_task_size, shards):
    assert driver.shard_count(size, workers, min_task_size) == shards


def test_min_task_size_from_the_config_is_kept_with_a_warning_naming_its_effect():
    cfg = oc_config()
    cfg["datasets"][0]["reader_cfg"]["test_range"] = "[0:8]"
    cfg["infer"] = {"partitioner": {"type": "opencompass.partitioners.NumWorkerPartitioner", "min_task_size": 16}}
    driver.prepare(cfg, settings(max_num_workers=4))
    assert cfg["infer"]["partitioner"]["min_task_size"] == 16
    shards, warnings = driver.shard_warnings(cfg, {"openai_humaneval": 164}, 4)
    assert shards == {"openai_humaneval": 1}
    (line,) = warnings
    assert "'openai_humaneval' (8 items) is split into 1 shard(s), not opencompass.max_num_workers=4" in line
    assert "min_task_size=16" in line and "3 worker(s) get no work" in line


def test_no_warning_when_every_worker_gets_a_shard():
    cfg = oc_config()
    driver.prepare(cfg, settings(max_num_workers=2, test_range="[10:14]"))
    assert driver.shard_warnings(cfg, {"openai_humaneval": 164}, 2) == ({"openai_humaneval": 2}, [])


@pytest.mark.parametrize("runner_type", ["opencompass.runners.SlurmRunner", "DLCRunner"])
def test_num_gpus_of_a_cluster_runner_passes_through(runner_type):
    cfg = oc_config(run_cfg={"num_gpus": 4, "num_procs": 4})
    cfg["infer"] = {"runner": {"type": runner_type, "partition": "gpu"}}
    notes = driver.prepare(cfg, settings(visible_gpus=0))  # this machine has no GPU; the nodes do
    assert cfg["models"][0]["run_cfg"] == {"num_gpus": 4, "num_procs": 4}
    assert notes["models"][0]["num_gpus"] == 4 and notes["warnings"] == []


def test_num_gpus_of_the_local_runner_named_in_the_config_is_clamped():
    cfg = oc_config(run_cfg={"num_gpus": 4})
    cfg["infer"] = {"runner": {"type": "LocalRunner"}}
    driver.prepare(cfg, settings(visible_gpus=2))
    assert cfg["models"][0]["run_cfg"]["num_gpus"] == 2


# ---------------------------------------------------------------------------------------------
# validation, before any model loads
# ---------------------------------------------------------------------------------------------


def _run_cfg(tmp_path, tiny_model_dir, tiny_text_file, save=None, **oc):
    section = {"cfg_path": str(ROOT / "configs" / "opencompass" / "humaneval_base.py"), "output_path": str(tmp_path / "oc")}
    section.update(oc)
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "save", save=save or {"save_path": str(tmp_path / "save"), "save_trans": True}, opencompass=section)
    cfg["eval"]["num_samples"] = 2  # keep the perplexity passes short
    return cfg


def _problems(cfg) -> list[str]:
    with pytest.raises(LlmcError) as info:
        validate(cfg)
    return info.value.problems


def test_save_trans_is_required(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    lines = _problems(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, save={"save_path": str(tmp_path / "save")}))
    assert any("needs save.save_trans: true" in line for line in lines), lines
    validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file))  # and with it, the config is valid


def test_path_in_cfg_path_models_fails_validation(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    bad = tmp_path / "bad.py"
    bad.write_text("models = [dict(type='X', abbr='mine', path='/models/llama')]\ndatasets = []\n")
    lines = _problems(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, cfg_path=str(bad)))
    assert any(f"{bad}:1: the model entry 'mine' sets path" in line for line in lines), lines
    lines = _problems(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, cfg_path=str(tmp_path / "missing.py")))
    assert any("missing.py does not exist" in line for line in lines), lines


def test_shipped_configs_have_no_model_path():
    for name in ("humaneval_base.py", "humaneval_chat.py"):
        assert checks.cfg_path_problems(str(ROOT / "configs" / "opencompass" / name)) == []


def test_quickstart_config_validates(monkeypatch, tmp_path, shared_data, smollm2_path):
    from llmc_core import config

    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    monkeypatch.chdir(ROOT)  # cfg_path is relative to the repo root
    monkeypatch.setenv("LLMC_OUT", str(tmp_path))
    monkeypatch.setenv("LLMC_DATA", str(shared_data))
    cfg = config.load("configs/quickstart/awq_w4g64_smollm2_opencompass.yml")
    step, options = cfg.steps["opencompass"]
    assert step.name == "opencompass" and cfg.save.save_trans
    assert (options.max_num_workers, options.eval_mode, options.test_range) == (2, ["fake_quant"], "[0:4]")
    assert {"pretrain", "fake_quant"} <= cfg.positions() and cfg.quant.method == "awq"


def test_every_key_of_the_section_is_documented():
    from llmc_plugins.evaluators.opencompass import OpenCompassConfig

    doc = (ROOT / "docs" / "opencompass.md").read_text(encoding="utf-8")
    table = {line.split("|")[1].strip().strip("`") for line in doc.splitlines() if line.startswith("| `")}
    assert set(OpenCompassConfig.model_fields) <= table, set(OpenCompassConfig.model_fields) - table


def test_missing_opencompass_gives_the_pip_command(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name: None)
    lines = _problems(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file))
    assert any("pip install -e '.[opencompass]'" in line for line in lines), lines
    lines = _problems(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, python=str(tmp_path / "nopython")))
    assert any("opencompass.python:" in line and "not an executable" in line for line in lines), lines


def test_fake_quant_of_an_activation_scheme_is_refused(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    """OpenCompass loads the saved folder with plain transformers: without llmc's activation
    quantizers it would score another model than the one llmc measured (fail closed)."""
    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    cfg = _run_cfg(tmp_path, tiny_model_dir, tiny_text_file)
    cfg["quant"]["act"] = {"bit": 8, "symmetric": True, "granularity": "per_token"}
    lines = _problems(cfg)
    assert any(line.startswith("opencompass.eval_mode: fake_quant with") and "lm_eval" in line for line in lines), lines
    cfg["opencompass"]["eval_mode"] = ["pretrain"]
    validate(cfg)  # the float model is fine


def test_non_empty_output_path_is_refused_unless_overwrite(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    out = tmp_path / "oc"
    out.mkdir()
    validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file))  # an empty folder is fine
    (out / "20250101_000000").mkdir()  # an earlier OpenCompass run
    lines = _problems(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file))
    assert any(f"opencompass.output_path: {out} already exists and is not empty" in line and "save.overwrite: true" in line for line in lines), lines
    validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, save={"save_path": str(tmp_path / "save"), "save_trans": True, "overwrite": True}))
    validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file), resume=True)  # the interrupted run's own output


@pytest.mark.parametrize(("key", "value"), [("timeout", 0), ("timeout", -5), ("timeout", "soon"), ("humaneval_timeout", 0)])
def test_timeouts_are_validated(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch, key, value):
    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    lines = _problems(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, **{key: value}))
    assert any(f"opencompass.{key}" in line for line in lines), lines
    _, options = validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, **{key: 90})).steps["opencompass"]
    assert getattr(options, key) == 90.0


def test_timeout_default_is_generous(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    _, options = validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file)).steps["opencompass"]
    assert options.timeout >= 3600 and options.humaneval_timeout == 3.0


# ---------------------------------------------------------------------------------------------
# the OpenCompass subprocess: timeout, killed
# ---------------------------------------------------------------------------------------------


def _fake_python(tmp_path, body: str) -> str:
    """An executable standing in for OpenCompass's Python: ``<it> llmc_oc_driver.py settings.json``."""
    exe = tmp_path / "fake_python"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)
    return str(exe)


def _options(tmp_path, **kw):
    from llmc_plugins.evaluators.opencompass import OpenCompassConfig

    return OpenCompassConfig(cfg_path=str(tmp_path / "x.py"), **kw)


def test_a_run_past_the_timeout_is_stopped_with_its_whole_process_group(tmp_path):
    # the driver starts a task process (as OpenCompass's runner does) and both hang
    python = _fake_python(tmp_path, f"sleep 300 &\necho $! > {tmp_path}/child.pid\necho started\nwait\n")
    out = tmp_path / "oc"
    with pytest.raises(LlmcError) as info:
        runner.run_driver(_options(tmp_path, python=python, timeout=2), out, {}, dict(os.environ))
    (line,) = info.value.problems
    assert "ran past opencompass.timeout (2s)" in line and str(out / "llmc_opencompass.log") in line
    child = int((tmp_path / "child.pid").read_text())
    assert _gone(child), "the task process outlived the timeout"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone too (the sleep was reparented and not reaped yet)
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_a_killed_run_is_reported_as_killed(tmp_path):
    python = _fake_python(tmp_path, "echo loading\nkill -9 $$\n")
    out = tmp_path / "oc"
    with pytest.raises(LlmcError) as info:
        runner.run_driver(_options(tmp_path, python=python), out, {}, dict(os.environ))
    (line,) = info.value.problems
    assert "killed by signal SIGKILL" in line and "out of memory" in line and str(out / "llmc_opencompass.log") in line


def test_a_stale_manifest_is_never_read_back(tmp_path):
    out = tmp_path / "oc"
    out.mkdir()
    (out / "llmc_manifest.json").write_text("{}")  # from an earlier run
    runner.run_driver(_options(tmp_path, python=_fake_python(tmp_path, "exit 0\n")), out, {}, dict(os.environ))
    assert not (out / "llmc_manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# reading results back; failures
# ---------------------------------------------------------------------------------------------


def _infer_log(abbr: str, task: str, sha: str | None, path: str = "/m/fake") -> str:
    """An inference task log as OpenCompass 0.5's LocalRunner writes it (its logger's line format)."""
    lines = [f"12/01 21:38:03 - OpenCompass - INFO - Task [{abbr}/{task}]", "Loading weights: 100%|##########| 20/20"]
    if sha is not None:  # logged by llmc_oc_compat's model class once it has loaded the weights
        lines.append(f"12/01 21:38:04 - OpenCompass - INFO - llmc: evaluated weights sha256={sha} path={path}")
    lines += [f"12/01 21:38:04 - OpenCompass - INFO - Start inferencing [{abbr}/{task}]", "12/01 21:38:16 - OpenCompass - INFO - time elapsed: 13.17s"]
    return "\n".join(lines) + "\n"


def _work_dir(tmp_path, shards_done=(0, 1), result=None, sha="a" * 64, abbr="llmc-fake_quant", path="/m/fake"):
    """OpenCompass's work dir layout for one model, one dataset in two shards (as a real run writes it)."""
    work = tmp_path / "20260101_000000"
    ds = "openai_humaneval"
    for i in (0, 1):
        log = work / "logs" / "infer" / abbr / f"{ds}_{i}.out"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(_infer_log(abbr, f"{ds}_{i}", sha, path))
        if i in shards_done:
            (work / "predictions" / abbr).mkdir(parents=True, exist_ok=True)
            (work / "predictions" / abbr / f"{ds}_{i}.json").write_text("{}")
    if result is not None:
        (work / "results" / abbr).mkdir(parents=True, exist_ok=True)
        (work / "results" / abbr / f"{ds}.json").write_text(json.dumps(result))
    (work / "logs" / "eval" / abbr).mkdir(parents=True, exist_ok=True)
    (work / "logs" / "eval" / abbr / f"{ds}.out").write_text("eval log\n")
    manifest = {"models": [{"abbr": abbr, "mode": abbr.rsplit("-", 1)[-1]}], "datasets": [ds], "work_dir": str(work), "effective_config": str(tmp_path / "x.py")}
    return work, manifest


def test_results_become_rows_with_shard_count(tmp_path):
    _, manifest = _work_dir(tmp_path, result={"pass@1": 25.0, "details": {}})
    assert runner.read_results(manifest, {"fake_quant": "a" * 64}) == [("fake_quant", "openai_humaneval", "pass@1", 25.0, 2)]


def test_failed_inference_shard_fails_the_step_with_its_log(tmp_path):
    work, manifest = _work_dir(tmp_path, shards_done=(1,))
    with pytest.raises(LlmcError) as info:
        runner.read_results(manifest, {"fake_quant": "a" * 64})
    assert str(work / "logs" / "infer" / "llmc-fake_quant" / "openai_humaneval_0.out") in str(info.value)


def test_failed_evaluation_fails_the_step_with_its_log(tmp_path):
    work, manifest = _work_dir(tmp_path, result={"error": "preds and refrs have different length"})
    with pytest.raises(LlmcError, match="different length") as info:
        runner.read_results(manifest, {"fake_quant": "a" * 64})
    assert str(work / "logs" / "eval" / "llmc-fake_quant" / "openai_humaneval.out") in str(info.value)


def test_other_weights_than_llmcs_fail_the_step(tmp_path):
    work, manifest = _work_dir(tmp_path, result={"pass@1": 0.0})
    with pytest.raises(LlmcError, match="evaluated weights with sha256") as info:
        runner.read_results(manifest, {"fake_quant": "b" * 64})
    assert str(work / "logs" / "infer" / "llmc-fake_quant" / "openai_humaneval_0.out") in str(info.value)


def test_no_fingerprint_logged_fails_the_step(tmp_path):
    work, manifest = _work_dir(tmp_path, result={"pass@1": 50.0}, sha=None)  # e.g. a model class that does not log it
    with pytest.raises(LlmcError, match="logs no weights fingerprint") as info:
        runner.read_results(manifest, {"fake_quant": "a" * 64})
    assert len(info.value.problems) == 2  # both shards' logs named
    assert str(work / "logs" / "infer" / "llmc-fake_quant" / "openai_humaneval_1.out") in str(info.value)


def test_one_shard_without_a_fingerprint_fails_the_step(tmp_path):
    work, manifest = _work_dir(tmp_path, result={"pass@1": 50.0})
    log = work / "logs" / "infer" / "llmc-fake_quant" / "openai_humaneval_1.out"
    log.write_text(_infer_log("llmc-fake_quant", "openai_humaneval_1", None))
    with pytest.raises(LlmcError, match="logs no weights fingerprint") as info:
        runner.read_results(manifest, {"fake_quant": "a" * 64})
    assert info.value.problems == [next(line for line in info.value.problems if str(log) in line)]


def test_no_inference_log_or_no_expected_fingerprint_fails_the_step(tmp_path):
    work, manifest = _work_dir(tmp_path, result={"pass@1": 50.0})
    with pytest.raises(LlmcError, match="llmc has no weights fingerprint for its fake_quant model"):
        runner.read_results(manifest, {"fake_quant": None})
    with pytest.raises(LlmcError, match="llmc has no weights fingerprint"):
        runner.read_results(manifest, {})
    for log in (work / "logs" / "infer" / "llmc-fake_quant").glob("*.out"):
        log.unlink()
    with pytest.raises(LlmcError, match="has no inference log"):
        runner.read_results(manifest, {"fake_quant": "a" * 64})


# ---------------------------------------------------------------------------------------------
# a run: what OpenCompass is handed is exactly the fake-quant model
# ---------------------------------------------------------------------------------------------


def _stand_in_for_opencompass(handed: dict, log_fingerprint: bool = True, load=lambda mode, path: path):
    """Replaces the OpenCompass subprocess: writes its work dir layout for every model it is handed,
    with the fingerprint llmc_oc_compat's class would log: that of the folder as transformers loads it
    (``load`` picks the folder, to play an OpenCompass that loads the wrong one)."""
    from transformers import AutoModelForCausalLM

    from llmc_plugins.evaluators.opencompass.oc_side.llmc_oc_weights import weights_fingerprint

    def fake_driver(options, out, settings, env):
        handed.update(settings=settings, env=env)
        models = []
        for model in settings["models"]:
            folder = load(model["mode"], model["path"])
            sha = weights_fingerprint(AutoModelForCausalLM.from_pretrained(folder, dtype="auto")) if log_fingerprint else None
            work, manifest = _work_dir(out, result={"pass@1": 50.0}, sha=sha, abbr=f"llmc-{model['mode']}", path=folder)
            models += manifest["models"]
        Path(settings["manifest"]).write_text(json.dumps({**manifest, "models": models}))
        return out / "llmc_opencompass.log"

    return fake_driver


def test_evaluated_folder_holds_exactly_the_fake_quant_weights(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from llmc_core.run import Run
    from llmc_plugins.evaluators.opencompass.oc_side.llmc_oc_weights import weights_fingerprint

    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    handed = {}
    monkeypatch.setattr(runner, "run_driver", _stand_in_for_opencompass(handed))
    run = Run(validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, max_num_workers=2, eval_mode=["fake_quant", "transformed"])))
    records = run.execute()  # the fingerprint check ran on both models' logs and passed

    folder = Path(handed["settings"]["models"][0]["path"])
    assert folder == (tmp_path / "save" / "fake_quant_model").absolute()
    assert handed["settings"]["models"][1] == {"mode": "transformed", "path": str((tmp_path / "save" / "transformed_model").absolute())}
    evaluated = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    mine = run.model.state_dict()  # the in-memory model after the run: the fake-quant one
    assert evaluated.state_dict().keys() == mine.keys()
    for name, tensor in evaluated.state_dict().items():
        assert torch.equal(tensor, mine[name]), name
    assert weights_fingerprint(evaluated) == weights_fingerprint(run.model)
    # and these are the weights whose fake_quant perplexity the run reported: quantized, not float
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="auto").state_dict()
    assert not torch.equal(original["model.layers.0.mlp.down_proj.weight"], mine["model.layers.0.mlp.down_proj.weight"])
    by_pos = {(r.position, r.evaluator, r.metric): r.value for r in records}
    assert ("fake_quant", "ppl", "perplexity") in by_pos and by_pos[("fake_quant", "opencompass", "pass@1")] == 50.0
    assert by_pos[("transformed", "opencompass", "pass@1")] == 50.0
    saved = json.loads((tmp_path / "save" / "results.json").read_text())
    assert {"position": "fake_quant", "evaluator": "opencompass", "metric": "pass@1"}.items() <= next(r for r in saved["results"] if r["evaluator"] == "opencompass").items()
    assert handed["env"]["HF_HUB_OFFLINE"] == "1" and str(SIDE) in handed["env"]["PYTHONPATH"]
    assert handed["settings"]["trust_remote_code"] is False  # the llmc config did not turn it on


def test_a_run_whose_opencompass_logs_no_fingerprint_fails(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    from llmc_core.run import Run

    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    monkeypatch.setattr(runner, "run_driver", _stand_in_for_opencompass({}, log_fingerprint=False))
    run = Run(validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file)))
    with pytest.raises(LlmcError, match="logs no weights fingerprint"):
        run.execute()


def test_a_run_whose_opencompass_loads_other_weights_for_transformed_fails(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    from llmc_core.run import Run

    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    wrong = lambda mode, path: path.replace("transformed_model", "fake_quant_model")  # noqa: E731
    monkeypatch.setattr(runner, "run_driver", _stand_in_for_opencompass({}, load=wrong))
    run = Run(validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, eval_mode=["fake_quant", "transformed"])))
    with pytest.raises(LlmcError, match="llmc-transformed evaluated weights with sha256 .* but llmc's transformed model has"):
        run.execute()


# ---------------------------------------------------------------------------------------------
# with OpenCompass
# ---------------------------------------------------------------------------------------------


def _effective_config(tmp_path, cfg_path, **kw) -> tuple[dict, str]:
    """Run the real driver (OpenCompass loads ``cfg_path``) up to the effective config it writes."""
    python = oc_python()
    out = tmp_path / "oc"
    out.mkdir()
    s = {
        "cfg_path": str(cfg_path),
        "output_path": str(out),
        "manifest": str(out / "m.json"),
        "prepare_only": True,
        **settings(**kw),
    }
    if HUMANEVAL.is_file():
        s["make_data_cache"], s["humaneval_path"] = True, str(HUMANEVAL)
    (tmp_path / "s.json").write_text(json.dumps(s))
    env = dict(os.environ, PYTHONPATH=str(SIDE), COMPASS_DATA_CACHE=str(out / "cache"), HF_DATASETS_OFFLINE="1")
    done = subprocess.run([python, str(SIDE / "llmc_oc_driver.py"), str(tmp_path / "s.json")], cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ns: dict = {}
    exec((out / "llmc_effective_config.py").read_text(), ns)  # a dumped config is plain Python
    return ns, done.stderr


def test_generated_config_from_a_shipped_config(tmp_path):
    ns, _ = _effective_config(
        tmp_path, ROOT / "configs" / "opencompass" / "humaneval_chat.py",
        models=[{"mode": "fake_quant", "path": "/m/fake"}], max_num_workers=2, visible_gpus=0, test_range="[10:14]", humaneval_timeout=5.0,
    )
    (model,) = ns["models"]
    assert (model["path"], model["tokenizer_path"], model["abbr"]) == ("/m/fake", "/m/fake", "llmc-fake_quant")
    assert model["run_cfg"]["num_gpus"] == 0 and model["type"] == "llmc_oc_compat.HuggingFacewithChatTemplate"
    # OpenCompass's own default is trust_remote_code=True for both
    assert model["model_kwargs"]["trust_remote_code"] is False and model["tokenizer_kwargs"]["trust_remote_code"] is False
    assert ns["infer"]["partitioner"]["num_worker"] == 2 and ns["infer"]["runner"]["max_num_workers"] == 2
    assert ns["datasets"][0]["reader_cfg"]["test_range"] == "[10:14]"
    assert ns["datasets"][0]["eval_cfg"]["evaluator"]["timeout"] == 5.0
    # OpenCompass's size cache holds the full size, so a range not starting at 0 still splits in two
    assert json.loads(Path(ns["infer"]["partitioner"]["dataset_size_path"]).read_text()) == {"openai_humaneval": 164}


SLURM_CFG = """
from mmengine.config import read_base
from opencompass.models import HuggingFaceBaseModel
from opencompass.partitioners import NumWorkerPartitioner
from opencompass.runners import SlurmRunner
from opencompass.tasks import OpenICLInferTask
with read_base():
    from opencompass.configs.datasets.humaneval.internal_humaneval_gen_d2537e import humaneval_datasets
datasets = [*humaneval_datasets]
models = [dict(type=HuggingFaceBaseModel, abbr='big', max_out_len=16, batch_size=8, run_cfg=dict(num_gpus=4, num_procs=1))]
infer = dict(
    partitioner=dict(type=NumWorkerPartitioner, min_task_size=100),
    runner=dict(type=SlurmRunner, partition='llm', quotatype='auto', max_num_workers=1, task=dict(type=OpenICLInferTask)),
)
"""


def test_effective_config_for_a_slurm_runner_keeps_num_gpus_and_warns_about_min_task_size(tmp_path):
    cfg = tmp_path / "slurm.py"
    cfg.write_text(SLURM_CFG)  # classes imported at the top: objects once loaded, names once dumped
    ns, stderr = _effective_config(tmp_path, cfg, max_num_workers=4, visible_gpus=0, test_range="[0:150]")
    (model,) = ns["models"]
    assert model["run_cfg"] == {"num_gpus": 4, "num_procs": 1}  # the Slurm nodes have the cards, not this machine
    runner_cfg, part = ns["infer"]["runner"], ns["infer"]["partitioner"]
    assert runner_cfg["type"] == "opencompass.runners.slurm.SlurmRunner" and runner_cfg["partition"] == "llm"
    assert runner_cfg["max_num_workers"] == 4 and part["num_worker"] == 4
    # the config's min_task_size is kept, and what it costs is said: 150 items make 2 shards, not 4
    assert part["type"] == "opencompass.partitioners.num_worker.NumWorkerPartitioner" and part["min_task_size"] == 100
    assert "llmc-opencompass: warning: dataset 'openai_humaneval' (150 items) is split into 2 shard(s), not opencompass.max_num_workers=4" in stderr
    assert "min_task_size=100" in stderr


SHARDS_MATCH = r"""
import json, math, sys, tempfile
from mmengine.config import ConfigDict
from opencompass.partitioners import NumWorkerPartitioner
import llmc_oc_driver as d
bad = []
with tempfile.TemporaryDirectory() as tmp:
    for min_size in (1, 3, 16):
        for workers in range(1, 9):
            for size in range(0, 60):
                p = NumWorkerPartitioner(out_dir=tmp, num_worker=workers, min_task_size=min_size, dataset_size_path=tmp + '/s.json')
                p._dataset_size = {'ds': size}
                ds = ConfigDict(abbr='ds', reader_cfg=dict(test_range=''))
                theirs = 1 if workers <= 1 or size <= min_size else len(p.split_dataset(ds))
                if size > 0 and theirs != d.shard_count(size, workers, min_size):
                    bad.append((size, workers, min_size, theirs))
print(json.dumps(bad))
"""


def test_shard_count_matches_opencompass_numworkerpartitioner(tmp_path):
    python = oc_python()
    env = dict(os.environ, PYTHONPATH=str(SIDE))
    done = subprocess.run([python, "-c", SHARDS_MATCH], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


REMOTE_CODE = r"""
import json, sys
from llmc_oc_compat import HuggingFaceBaseModel
folder, mark = sys.argv[1], sys.argv[2]
ran = {}
for trust in (False, True):  # off first: a module once imported would not leave its mark again
    HuggingFaceBaseModel(path=folder, tokenizer_only=True, model_kwargs=dict(trust_remote_code=trust), tokenizer_kwargs=dict(trust_remote_code=trust))
    ran[str(trust)] = __import__("os").path.exists(mark)
print(json.dumps(ran))
"""


def test_compat_model_class_runs_no_remote_code_unless_trusted(tmp_path):
    # a model folder whose config names custom code (auto_map) that leaves a mark when imported;
    # OpenCompass's own max_seq_len lookup imports it whatever the kwargs say
    python = oc_python()
    folder = save_tiny_llama(tmp_path / "tiny", vocab=128)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_config.CustomConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    mark = tmp_path / "remote_code_ran"
    (folder / "custom_config.py").write_text(
        f"open({str(mark)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SIDE), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    done = subprocess.run([python, "-c", REMOTE_CODE, str(folder), str(mark)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    # off: the folder's code did not run; on: it did (so the probe can see it run)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"False": False, "True": True}


SUBSET_SCORE = r"""
import json, sys
from datasets import Dataset
from llmc_oc_compat import HumanEvalEvaluator
rows = [json.loads(line) for line in open(sys.argv[1])][10:13]   # a subset not starting at 0
preds = [r["canonical_solution"] for r in rows]
preds[1] = "    return None\n"                                    # one wrong answer
print(json.dumps(HumanEvalEvaluator(k=[1, 10, 100]).score(preds, [r["task_id"] for r in rows], Dataset.from_list(rows))))
"""


def test_humaneval_subset_is_scored_on_its_own_problems(tmp_path):
    python = oc_python()
    if not HUMANEVAL.is_file():
        pytest.skip(f"HumanEval not found at {HUMANEVAL} (set LLMC_DATA)")
    env = dict(os.environ, PYTHONPATH=str(SIDE))
    done = subprocess.run([python, "-c", SUBSET_SCORE, str(HUMANEVAL)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pass@1"] == pytest.approx(200 / 3)  # 2 of the 3 problems, where the stock evaluator refuses
    assert [d["passed"] for d in result["details"].values()] == [True, False, True]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_text_file):
    """``llmc run`` → RTN → PPL → OpenCompass HumanEval (4 problems, 2 workers) on a tiny Llama, once."""
    from llmc_core.testing import run_cli, write_config

    python = oc_python()
    tmp_path = tmp_path_factory.mktemp("e2e")
    model_dir = save_tiny_llama(tmp_path / "tiny", vocab=128)
    oc_cfg = tmp_path / "tiny_humaneval.py"
    oc_cfg.write_text(
        "from mmengine.config import read_base\n"
        "from opencompass.models import HuggingFaceBaseModel\n"
        "with read_base():\n"
        "    from opencompass.configs.datasets.humaneval.internal_humaneval_gen_d2537e import humaneval_datasets\n"
        "datasets = [*humaneval_datasets]\n"
        "models = [dict(type=HuggingFaceBaseModel, abbr='tiny', max_out_len=8, batch_size=2, max_seq_len=128, run_cfg=dict(num_gpus=1))]\n"
    )
    section = {"cfg_path": str(oc_cfg), "output_path": str(tmp_path / "oc"), "max_num_workers": 2, "test_range": "[0:4]", "python": python}
    if HUMANEVAL.is_file():
        section["humaneval_path"] = str(HUMANEVAL)
    cfg = run_config(model_dir, tiny_text_file, tmp_path / "save", eval_pos=("fake_quant",), save={"save_path": str(tmp_path / "save"), "save_trans": True}, opencompass=section)
    cfg["eval"]["num_samples"] = 2
    result = run_cli("run", str(write_config(tmp_path / "run.yml", cfg)))
    assert result.exit_code == 0, (result.stdout + result.stderr)[-3000:]
    return tmp_path


@pytest.mark.slow
def test_end_to_end_tiny_model_two_shards(e2e):
    from llmc_core.testing import read_results

    got = read_results(e2e / "save")
    assert ("fake_quant", "ppl", "custom", "perplexity") in got
    assert 0.0 <= got[("fake_quant", "opencompass", "openai_humaneval", "pass@1")] <= 100.0
    manifest = json.loads((e2e / "oc" / "llmc_manifest.json").read_text())
    work = Path(manifest["work_dir"])
    shards = sorted(p.name for p in (work / "predictions" / "tiny-fake_quant").glob("*.json"))
    assert shards == ["openai_humaneval_0.json", "openai_humaneval_1.json"]
    assert manifest["shards"] == {"openai_humaneval": 2}
    details = json.loads((work / "results" / "tiny-fake_quant" / "openai_humaneval.json").read_text())["details"]
    assert len(details) == 4  # the subset was scored, not refused


@pytest.mark.slow
def test_fingerprint_check_on_a_real_opencompass_work_dir(e2e, tmp_path):
    """The real check on what a real OpenCompass run wrote: its logs carry llmc's fingerprint, and
    the same work dir with a wrong fingerprint, or with the fingerprint lines gone, fails."""
    import shutil

    from transformers import AutoModelForCausalLM

    from llmc_plugins.evaluators.opencompass.oc_side.llmc_oc_weights import weights_fingerprint

    manifest = json.loads((e2e / "oc" / "llmc_manifest.json").read_text())
    want = weights_fingerprint(AutoModelForCausalLM.from_pretrained(e2e / "save" / "fake_quant_model", dtype="auto"))
    rows = runner.read_results(manifest, {"fake_quant": want})
    assert [(mode, ds, metric) for mode, ds, metric, _, shards in rows if metric == "pass@1"] == [("fake_quant", "openai_humaneval", "pass@1")]
    logs = sorted((Path(manifest["work_dir"]) / "logs" / "infer" / "tiny-fake_quant").glob("*.out"))
    assert [p.name for p in logs] == ["openai_humaneval_0.out", "openai_humaneval_1.out"]

    with pytest.raises(LlmcError, match="evaluated weights with sha256") as info:
        runner.read_results(manifest, {"fake_quant": "0" * 64})
    assert len(info.value.problems) == 2  # one line per shard's log

    work = tmp_path / Path(manifest["work_dir"]).name  # the same work dir, the fingerprint lines removed
    shutil.copytree(manifest["work_dir"], work)
    for log in (work / "logs" / "infer" / "tiny-fake_quant").glob("*.out"):
        text = log.read_text()
        assert runner.FINGERPRINT.search(text)
        log.write_text("\n".join(line for line in text.splitlines() if "llmc: evaluated weights" not in line))
    with pytest.raises(LlmcError, match="logs no weights fingerprint") as info:
        runner.read_results({**manifest, "work_dir": str(work)}, {"fake_quant": want})
    assert len(info.value.problems) == 2
