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
    step, options = cfg.extras["opencompass"]
    assert step.name == "opencompass" and cfg.save.save_trans
    assert (options.max_num_workers, options.eval_mode, options.test_range) == (2, ["fake_quant"], "[0:4]")
    assert {"pretrain", "fake_quant"} <= cfg.positions() and cfg.quant.method == "awq"


def test_missing_opencompass_gives_the_pip_command(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name: None)
    lines = _problems(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file))
    assert any("pip install -e '.[opencompass]'" in line for line in lines), lines
    lines = _problems(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, python=str(tmp_path / "nopython")))
    assert any("opencompass.python:" in line and "not an executable" in line for line in lines), lines


# ---------------------------------------------------------------------------------------------
# reading results back; failures
# ---------------------------------------------------------------------------------------------


def _work_dir(tmp_path, shards_done=(0, 1), result=None):
    work = tmp_path / "20260101_000000"
    abbr, ds = "llmc-fake_quant", "openai_humaneval"
    for i in (0, 1):
        log = work / "logs" / "infer" / abbr / f"{ds}_{i}.out"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"llmc: evaluated weights sha256={'a' * 64} path=/m/fake\n")
        if i in shards_done:
            (work / "predictions" / abbr).mkdir(parents=True, exist_ok=True)
            (work / "predictions" / abbr / f"{ds}_{i}.json").write_text("{}")
    if result is not None:
        (work / "results" / abbr).mkdir(parents=True, exist_ok=True)
        (work / "results" / abbr / f"{ds}.json").write_text(json.dumps(result))
    (work / "logs" / "eval" / abbr).mkdir(parents=True, exist_ok=True)
    (work / "logs" / "eval" / abbr / f"{ds}.out").write_text("eval log\n")
    manifest = {"models": [{"abbr": abbr, "mode": "fake_quant"}], "datasets": [ds], "work_dir": str(work), "effective_config": str(tmp_path / "x.py")}
    return work, manifest


def test_results_become_rows_with_shard_count(tmp_path):
    _, manifest = _work_dir(tmp_path, result={"pass@1": 25.0, "details": {}})
    assert runner.read_results(manifest, {"fake_quant": "a" * 64}) == [("fake_quant", "openai_humaneval", "pass@1", 25.0, 2)]


def test_failed_inference_shard_fails_the_step_with_its_log(tmp_path):
    work, manifest = _work_dir(tmp_path, shards_done=(1,))
    with pytest.raises(LlmcError) as info:
        runner.read_results(manifest)
    assert str(work / "logs" / "infer" / "llmc-fake_quant" / "openai_humaneval_0.out") in str(info.value)


def test_failed_evaluation_fails_the_step_with_its_log(tmp_path):
    work, manifest = _work_dir(tmp_path, result={"error": "preds and refrs have different length"})
    with pytest.raises(LlmcError, match="different length") as info:
        runner.read_results(manifest)
    assert str(work / "logs" / "eval" / "llmc-fake_quant" / "openai_humaneval.out") in str(info.value)


def test_other_weights_than_llmcs_fail_the_step(tmp_path):
    _, manifest = _work_dir(tmp_path, result={"pass@1": 0.0})
    with pytest.raises(LlmcError, match="evaluated weights with sha256"):
        runner.read_results(manifest, {"fake_quant": "b" * 64})


# ---------------------------------------------------------------------------------------------
# a run: what OpenCompass is handed is exactly the fake-quant model
# ---------------------------------------------------------------------------------------------


def test_evaluated_folder_holds_exactly_the_fake_quant_weights(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from llmc_core.run import Run
    from llmc_plugins.evaluators.opencompass.oc_side.llmc_oc_weights import weights_fingerprint

    monkeypatch.setattr(checks, "install_problems", lambda python: [])
    handed = {}

    def fake_driver(options, out, settings, env):  # stands in for the OpenCompass subprocess
        handed.update(settings=settings, env=env)
        work, manifest = _work_dir(out, result={"pass@1": 50.0})
        manifest["models"] = [{"abbr": "llmc-fake_quant", "mode": "fake_quant"}]
        Path(settings["manifest"]).write_text(json.dumps(manifest))
        return out / "llmc_opencompass.log"

    monkeypatch.setattr(runner, "run_driver", fake_driver)
    monkeypatch.setattr(runner, "_logged_fingerprints", lambda work, abbr: set())
    run = Run(validate(_run_cfg(tmp_path, tiny_model_dir, tiny_text_file, max_num_workers=2)))
    records = run.execute()

    folder = Path(handed["settings"]["models"][0]["path"])
    assert folder == (tmp_path / "save" / "fake_quant_model").absolute()
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
    saved = json.loads((tmp_path / "save" / "results.json").read_text())
    assert {"position": "fake_quant", "evaluator": "opencompass", "metric": "pass@1"}.items() <= next(r for r in saved["results"] if r["evaluator"] == "opencompass").items()
    assert handed["env"]["HF_HUB_OFFLINE"] == "1" and str(SIDE) in handed["env"]["PYTHONPATH"]


# ---------------------------------------------------------------------------------------------
# with OpenCompass
# ---------------------------------------------------------------------------------------------


def test_generated_config_from_a_shipped_config(tmp_path):
    python = oc_python()
    out = tmp_path / "oc"
    out.mkdir()
    s = {
        "cfg_path": str(ROOT / "configs" / "opencompass" / "humaneval_chat.py"),
        "output_path": str(out),
        "manifest": str(out / "m.json"),
        "prepare_only": True,
        **settings(models=[{"mode": "fake_quant", "path": "/m/fake"}], max_num_workers=2, visible_gpus=0, test_range="[10:14]"),
    }
    (tmp_path / "s.json").write_text(json.dumps(s))
    env = dict(os.environ, PYTHONPATH=str(SIDE), COMPASS_DATA_CACHE=str(out / "cache"), HF_DATASETS_OFFLINE="1")
    if HUMANEVAL.is_file():
        s["make_data_cache"], s["humaneval_path"] = True, str(HUMANEVAL)
        (tmp_path / "s.json").write_text(json.dumps(s))
    done = subprocess.run([python, str(SIDE / "llmc_oc_driver.py"), str(tmp_path / "s.json")], cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ns: dict = {}
    exec((out / "llmc_effective_config.py").read_text(), ns)  # a dumped config is plain Python
    (model,) = ns["models"]
    assert (model["path"], model["tokenizer_path"], model["abbr"]) == ("/m/fake", "/m/fake", "llmc-fake_quant")
    assert model["run_cfg"]["num_gpus"] == 0 and model["type"] == "llmc_oc_compat.HuggingFacewithChatTemplate"
    assert ns["infer"]["partitioner"]["num_worker"] == 2 and ns["infer"]["runner"]["max_num_workers"] == 2
    assert ns["datasets"][0]["reader_cfg"]["test_range"] == "[10:14]"
    # OpenCompass's size cache holds the full size, so a range not starting at 0 still splits in two
    assert json.loads(Path(ns["infer"]["partitioner"]["dataset_size_path"]).read_text()) == {"openai_humaneval": 164}


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


@pytest.mark.slow
def test_end_to_end_tiny_model_two_shards(tmp_path, tiny_text_file):
    """llmc run → RTN → PPL → OpenCompass HumanEval (4 problems, 2 workers) on a tiny Llama."""
    import torch  # noqa: F401  (the tiny model is built here)

    from llmc_core.testing import read_results, run_cli, write_config

    python = oc_python()
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

    got = read_results(tmp_path / "save")
    assert ("fake_quant", "ppl", "custom", "perplexity") in got
    assert 0.0 <= got[("fake_quant", "opencompass", "openai_humaneval", "pass@1")] <= 100.0
    manifest = json.loads((tmp_path / "oc" / "llmc_manifest.json").read_text())
    work = Path(manifest["work_dir"])
    shards = sorted(p.name for p in (work / "predictions" / "tiny-fake_quant").glob("*.json"))
    assert shards == ["openai_humaneval_0.json", "openai_humaneval_1.json"]
    details = json.loads((work / "results" / "tiny-fake_quant" / "openai_humaneval.json").read_text())["details"]
    assert len(details) == 4  # the subset was scored, not refused
    # OpenCompass loaded exactly the fake-quant weights (its log carries their fingerprint)
    assert runner._logged_fingerprints(work, "tiny-fake_quant")
