"""The ``lm_eval`` step: validation, record shape, evaluation in place, and that it measures what
lm-eval itself measures.

Fast tests use a tiny Llama and a task YAML over local JSON lines written into tmp_path (no
network: the json builder reads the file). The slow test runs AWQ w4 g64 on SmolLM2 with the
shipped ``configs/lm_eval`` task and compares the in-process ``fake_quant`` number with lm-eval's
own CLI on the saved fake-quant folder.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmc_core.config import validate
from llmc_core.errors import LlmcError
from llmc_core.results import EvalRecord
from llmc_core.testing import WORDS, read_results, run_config, write_config

pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e '.[lm_eval]'")

from llmc_plugins.evaluators.lmeval import checks, runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A multiple-choice task over 20 local JSON lines: pick the word that follows."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = [{"context": " ".join(WORDS[i : i + 6]), "choices": [WORDS[i + 6], WORDS[i + 9], WORDS[i + 1]], "label": i % 3} for i in range(20)]
    for row in rows:  # put the true word at position label
        row["choices"].insert(row["label"], row["choices"].pop(0))
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n",
        encoding="utf-8",
    )
    return folder


def lm_section(task_dir: Path, **kw) -> dict:
    section = {"tasks": ["tiny_choice"], "include_path": str(task_dir), "eval_mode": ["pretrain", "fake_quant"], "limit": 12, "batch_size": 4}
    section.update(kw)
    return section


def problems(cfg: dict) -> list[str]:
    with pytest.raises(LlmcError) as info:
        validate(cfg)
    return info.value.problems


# ---------------------------------------------------------------------------------------------
# validation, before the model loads
# ---------------------------------------------------------------------------------------------


def test_valid_section_resolves_to_the_step(tiny_model_dir, tiny_text_file, tmp_path, task_dir):
    cfg = validate(run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", lm_eval=lm_section(task_dir, tasks="tiny_choice, tiny_*", limit=0.5)))
    step, options = cfg.steps["lm_eval"]
    assert step.name == "lm_eval" and options.tasks == ["tiny_choice", "tiny_*"] and options.include_path == [str(task_dir)]
    assert options.limit == 0.5 and step.positions(options) == ["pretrain", "fake_quant"]
    assert cfg.positions() == {"pretrain", "fake_quant"} and cfg.positions(steps=True) == {"pretrain", "fake_quant"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"batch_size": "big"}, "lm_eval.batch_size: give a positive number of documents, auto, or auto:N"),
        ({"limit": 2.5}, "lm_eval.limit: give a count of documents (an integer) or a fraction below 1"),
        ({"eval_mode": ["pretrain", "pretrain"]}, "lm_eval.eval_mode: list each position once"),
        ({"eval_mode": ["downstream"]}, "lm_eval.eval_mode.0: Input should be"),
        ({"num_fewshots": 5}, "lm_eval.num_fewshots: unknown key. Did you mean 'num_fewshot'?"),
    ],
)
def test_bad_options_are_one_line_each(tiny_model_dir, tiny_text_file, tmp_path, task_dir, changes, expected):
    lines = problems(run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", lm_eval=lm_section(task_dir, **changes)))
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_existing_output_path_is_refused_unless_overwrite(tiny_model_dir, tiny_text_file, tmp_path, task_dir):
    out = tmp_path / "lm_out"
    out.mkdir()
    (out / "results.json").write_text("{}")  # an earlier run's results
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", lm_eval=lm_section(task_dir, output_path=str(out)))
    (line,) = problems(cfg)
    assert line.startswith(f"lm_eval.output_path: {out} already exists and is not empty") and "save.overwrite: true" in line
    cfg["save"]["overwrite"] = True
    validate(cfg)


def test_missing_include_path_exits_2_before_the_model_loads(llmc_cli, tmp_path, tiny_model_dir, tiny_text_file, task_dir):
    missing = tmp_path / "no_tasks_here"
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", lm_eval=lm_section(task_dir, include_path=str(missing)))
    result = llmc_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)))
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("llmc: ")]
    assert len(lines) == 1 and lines[0].startswith(f"llmc: lm_eval.include_path: {missing} is not a folder."), lines
    assert "Traceback" not in result.stderr and "load model" not in result.stderr


def test_unknown_task_is_named_with_a_suggestion(tiny_model_dir, tiny_text_file, tmp_path, task_dir):
    lines = problems(run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", lm_eval=lm_section(task_dir, tasks=["tiny_choise", "tiny_choice"])))
    assert len(lines) == 1 and lines[0].startswith("lm_eval.tasks: unknown task 'tiny_choise'. Did you mean 'tiny_choice'?"), lines


def test_unknown_hub_task_without_include_path(tiny_model_dir, tiny_text_file, tmp_path):
    lines = problems(run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", lm_eval={"tasks": ["hellaswagg"], "eval_mode": ["pretrain"]}))
    assert len(lines) == 1 and lines[0].startswith("lm_eval.tasks: unknown task 'hellaswagg'. Did you mean 'hellaswag'?"), lines


def test_lm_eval_not_installed_says_how_to_install(tiny_model_dir, tiny_text_file, tmp_path, task_dir, monkeypatch):
    real = checks.importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    lines = problems(run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", lm_eval=lm_section(task_dir)))
    assert lines == [f"lm_eval: lm-eval is not installed in this Python. Install the lm_eval step with: {checks.INSTALL}."]


def test_quantized_positions_need_a_quant_section(tiny_model_dir, tiny_text_file, tmp_path, task_dir):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", eval_pos=("pretrain",), lm_eval=lm_section(task_dir, eval_mode=["pretrain", "real_quant"]))
    del cfg["quant"], cfg["calib"]
    assert problems(cfg) == ["lm_eval.eval_mode: real_quant needs a quant section (or use eval_mode: [pretrain])."]


def test_real_quant_needs_a_packable_spec(tiny_model_dir, tiny_text_file, tmp_path, task_dir):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", bit=3, lm_eval=lm_section(task_dir, eval_mode=["real_quant"]))
    lines = problems(cfg)
    assert len(lines) == 1 and lines[0].startswith("lm_eval.eval_mode: real_quant: ") and "Use fake_quant instead." in lines[0]


def test_missing_task_data_stops_the_run_before_the_model_loads(llmc_cli, tmp_path, tiny_model_dir, tiny_text_file, task_dir):
    folder = tmp_path / "tasks"
    folder.mkdir()
    text = (task_dir / "tiny_choice.yaml").read_text(encoding="utf-8").replace(str(task_dir / "docs.jsonl"), str(tmp_path / "gone.jsonl"))
    (folder / "tiny_choice.yaml").write_text(text, encoding="utf-8")
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", lm_eval=lm_section(folder))
    result = llmc_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)))
    assert result.exit_code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("llmc: ")]
    assert len(lines) == 1 and lines[0].startswith("llmc: lm_eval.tasks: lm-eval could not load tiny_choice ("), lines
    assert "Traceback" not in result.stderr and "load model" not in result.stderr


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------


def test_records_from_lm_eval_results():
    results = {
        "results": {
            "arc_easy": {"alias": "arc_easy", "sample_len": 100, "acc,none": 0.5, "acc_stderr,none": 0.05, "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A"},
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01, "exact_match,flexible-extract": float("nan")},
        }
    }
    got = [r.to_dict() for r in runner.records_from(results, "fake_quant", 3.0)]
    assert got == [
        {"position": "fake_quant", "evaluator": "lm_eval", "dataset": "arc_easy", "metric": "acc", "value": 0.5, "seconds": 3.0, "stderr": 0.05},
        {"position": "fake_quant", "evaluator": "lm_eval", "dataset": "arc_easy", "metric": "acc_norm", "value": 0.25, "seconds": 3.0},
        {"position": "fake_quant", "evaluator": "lm_eval", "dataset": "gsm8k", "metric": "exact_match,strict-match", "value": 0.1, "seconds": 3.0, "stderr": 0.01},
    ]


def test_records_without_stderr_keep_their_old_shape():
    old = {"position": "pretrain", "evaluator": "ppl", "dataset": "wikitext2", "metric": "perplexity", "value": 20.0, "seconds": 1.0}
    record = EvalRecord(**old)  # a results.json / checkpoint written before the stderr field
    assert record.to_dict() == old and record.shown_value() == "20.0000"
    assert EvalRecord(**old, stderr=0.25).shown_value() == "20.0000 ± 0.2500"


def test_rng_state_is_restored():
    import numpy as np
    import torch

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    with runner.kept_rng_state():  # what lm-eval's simple_evaluate does to them
        torch.manual_seed(1234), random.seed(0), np.random.seed(1234)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


# ---------------------------------------------------------------------------------------------
# a run
# ---------------------------------------------------------------------------------------------


def test_run_measures_in_place_and_matches_lm_eval_on_the_folder(llmc_cli, tmp_path, tiny_model_dir, tiny_text_file, task_dir):
    out = tmp_path / "out"
    cfg = run_config(tiny_model_dir, tiny_text_file, out, eval_pos=("pretrain", "fake_quant"), lm_eval=lm_section(task_dir, log_samples=True))
    result = llmc_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)))
    assert result.exit_code == 0, result.stderr
    payload = json.loads((out / "results.json").read_text(encoding="utf-8"))
    lm = [r for r in payload["results"] if r["evaluator"] == "lm_eval"]
    assert [(r["position"], r["dataset"], r["metric"]) for r in lm] == [(p, "tiny_choice", m) for p in ("pretrain", "fake_quant") for m in ("acc", "acc_norm")]
    assert all(0 <= r["value"] <= 1 and r["stderr"] > 0 for r in lm)
    stages = [s["stage"] for s in payload["stages"]]  # at its position: after pretrain PPL, before the method
    assert stages.index("eval pretrain (ppl custom)") < stages.index("eval pretrain (lm_eval)") < stages.index("rtn transform")
    assert stages.index("quantize") < stages.index("eval fake_quant (lm_eval)")
    assert "| pretrain | lm_eval | tiny_choice | acc |" in (out / "report.md").read_text(encoding="utf-8")
    for position in ("pretrain", "fake_quant"):
        full = json.loads((out / "lm_eval" / position / "results.json").read_text(encoding="utf-8"))
        assert full["n-samples"]["tiny_choice"]["effective"] == 12
        assert len((out / "lm_eval" / position / "samples_tiny_choice.jsonl").read_text(encoding="utf-8").splitlines()) == 12

    # pretrain is the tiny folder itself: lm-eval loading it gives the same per-choice log-likelihoods
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", tasks=["tiny_choice"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), limit=12, batch_size=4, device="cpu", log_samples=True)
    ours = [json.loads(line) for line in (out / "lm_eval" / "pretrain" / "samples_tiny_choice.jsonl").read_text(encoding="utf-8").splitlines()]
    def loglik(samples):  # each choice's (log-likelihood, is_greedy), flattened to the log-likelihoods
        return [float(r[0]) for s in samples for r in s["filtered_resps"]]

    assert len(loglik(ours)) == 36 and loglik(ours) == pytest.approx(loglik(theirs["samples"]["tiny_choice"]), rel=1e-5)
    values = read_results(out)
    assert values["pretrain", "lm_eval", "tiny_choice", "acc"] == theirs["results"]["tiny_choice"]["acc,none"]


# ---------------------------------------------------------------------------------------------
# SmolLM2: in process vs lm-eval's CLI on the saved folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_fake_quant_matches_lm_eval_cli_on_the_saved_folder(tmp_path, smollm2_hf, shared_data):
    env = dict(os.environ, LLMC_DATA=str(shared_data), **OFFLINE)
    out, limit = tmp_path / "run", 40
    overrides = [f"model.path={smollm2_hf}", f"save.save_path={out}", "save.save_fake=true", "calib.n_samples=2", "calib.seq_len=128", "quant.special.n_grid=5",  # short AWQ
                 "quant.special.weight_clip=false", "eval.num_samples=1", f"lm_eval.limit={limit}", "base.device=cpu"]  # fmt: skip
    cfg = ROOT / "configs" / "quickstart" / "awq_w4g64_smollm2_lm_eval.yml"
    llmc = [sys.executable, "-m", "llmc_core", "run", str(cfg), *overrides]
    start = time.perf_counter()
    done = subprocess.run(llmc, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"llmc run (AWQ + PPL + lm_eval at pretrain and fake_quant): {time.perf_counter() - start:.0f} s wall")
    ours = read_results(out)
    assert {k[0] for k in ours if k[1] == "lm_eval"} == {"pretrain", "fake_quant"}

    cli = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out / 'fake_quant_model'},dtype=float32",
           "--tasks", "llmc_wikitext2_cloze", "--include_path", str(ROOT / "configs" / "lm_eval"), "--limit", str(limit),
           "--batch_size", "16", "--num_fewshot", "0", "--device", "cpu", "--output_path", str(tmp_path / "cli")]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"lm_eval CLI on the fake-quant folder: {time.perf_counter() - start:.0f} s wall")
    theirs = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text(encoding="utf-8"))["results"]["llmc_wikitext2_cloze"]
    for metric in ("acc", "acc_norm"):
        print(f"fake_quant {metric}: llmc in process {ours['fake_quant', 'lm_eval', 'llmc_wikitext2_cloze', metric]:.4f}, lm_eval CLI on the folder {theirs[f'{metric},none']:.4f}")
        assert ours["fake_quant", "lm_eval", "llmc_wikitext2_cloze", metric] == theirs[f"{metric},none"]
