"""Running OpenCompass on the run's saved model folders and reading its results back.

The flow of :func:`run_step`: pick one model folder per ``eval_mode`` (:func:`model_folders`),
write the settings for the OpenCompass-side driver, run it in a subprocess with OpenCompass's
Python, then :func:`read_results` turns ``<work_dir>/results/<model>/<dataset>.json`` into
:class:`~llmc_core.results.EvalRecord` s, failing with the failing task's log when one is missing
(OpenCompass exits 0 even when every task failed), and when an inference log does not carry the
fingerprint of the weights llmc measured (another one, or none: missing evidence is a failure).
The subprocess runs at most ``opencompass.timeout`` seconds, in a process group of its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmc_core.errors import LlmcError
from llmc_core.results import EvalRecord
from llmc_core.state import ModelState

log = logging.getLogger("llmc")
SIDE = Path(__file__).with_name("oc_side")  # goes on PYTHONPATH of the OpenCompass processes
DRIVER = SIDE / "llmc_oc_driver.py"
FINGERPRINT = re.compile(r"llmc: evaluated weights sha256=([0-9a-f]{64}) path=(\S+)")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def output_path(run_config: Any, options: Any) -> Path:
    """OpenCompass's work dir: ``opencompass.output_path``, else ``<save_path>/opencompass``."""
    return Path(options.output_path or run_config.save_path / "opencompass").absolute()


def model_folders(state: Any, options: Any) -> list[dict[str, Any]]:
    """``[{mode, path, sha256}]``: the folder OpenCompass loads for each ``eval_mode``.

    - ``fake_quant``: the folder the ``fake`` saver wrote when ``save.save_fake`` is on, else the
      same saver's output written now from the in-memory model, i.e. exactly the weights whose
      ``fake_quant`` perplexity the run just reported.
    - ``transformed``: the ``trans`` saver's folder (``save.save_trans``).
    - ``pretrain``: the model loaded afresh from ``model.path`` and saved as an HF folder.
    ``sha256`` is the weights fingerprint OpenCompass's logged one must equal: of the in-memory
    model for ``fake_quant`` and ``pretrain``; for ``transformed`` (quantization has overwritten the
    in-memory float weights by now) of the saved folder as transformers loads it here.
    """
    from llmc_plugins.evaluators.opencompass.oc_side.llmc_oc_weights import weights_fingerprint

    out = []
    for mode in options.eval_mode:
        if mode == "fake_quant":
            folder = state.saved.get("fake") or _save(state, "fake", state)
            out.append({"mode": mode, "path": str(Path(folder).absolute()), "sha256": weights_fingerprint(state.model)})
        elif mode == "transformed":
            if "trans" not in state.saved:
                raise LlmcError("opencompass.eval_mode: transformed needs the transformed model, but it was not saved; set save.save_trans: true.")
            folder = Path(state.saved["trans"]).absolute()
            out.append({"mode": mode, "path": str(folder), "sha256": folder_fingerprint(folder, trust_remote_code(state.config))})
        else:
            model, tokenizer = state.config.model_family().load(state.config.model)
            folder = _save(state, "pretrain", ModelState(model, tokenizer, config=state.config))
            out.append({"mode": mode, "path": str(Path(folder).absolute()), "sha256": weights_fingerprint(model)})
            del model
    return out


def trust_remote_code(run_config: Any) -> bool:
    """llmc's ``model.trust_remote_code`` (off when the model family has no such key)."""
    return bool(getattr(run_config.model, "trust_remote_code", False))


def folder_fingerprint(folder: Path, trust: bool) -> str:
    """The weights fingerprint of a saved HF folder loaded the way OpenCompass's compat class loads it."""
    from transformers import AutoModelForCausalLM

    from llmc_plugins.evaluators.opencompass.oc_side.llmc_oc_weights import weights_fingerprint

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=trust)
    try:
        return weights_fingerprint(model)
    finally:
        del model


def _save(state: Any, what: str, source: Any) -> Path:
    from llmc_core.fsutil import atomic_folder
    from llmc_plugins.savers import save_hf_folder

    save = state.config.save
    overwrite = save.overwrite or getattr(state, "resume", False)
    if what == "fake":
        saver = state.manager.get("saver", "fake", "save")
        target = state.config.save_path / saver.folder
        with atomic_folder(target, overwrite=overwrite) as tmp:
            saver().save(source, str(tmp))
    else:
        target = state.config.save_path / "pretrain_model"
        with atomic_folder(target, overwrite=overwrite) as tmp:
            save_hf_folder(source, str(tmp))
    log.info("opencompass: saved the %s model for OpenCompass to %s", what, target)
    return target


def visible_gpus() -> int:
    """GPUs OpenCompass may use: CUDA's count, which honours ``CUDA_VISIBLE_DEVICES``."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def settings_for(options: Any, out: Path, models: list[dict[str, Any]], gpus: int, trust: bool = False, prepare_only: bool = False) -> dict[str, Any]:
    """The settings JSON handed to ``llmc_oc_driver.py`` (``trust``: llmc's ``model.trust_remote_code``)."""
    return {
        "cfg_path": str(Path(options.cfg_path).absolute()),
        "output_path": str(out),
        "manifest": str(out / "llmc_manifest.json"),
        "models": [{"mode": m["mode"], "path": m["path"]} for m in models],
        "max_num_workers": options.max_num_workers,
        "visible_gpus": gpus,
        "num_gpus": options.num_gpus,
        "test_range": options.test_range,
        "make_data_cache": not (options.data_cache or os.environ.get("COMPASS_DATA_CACHE")),
        "humaneval_path": str(Path(options.humaneval_path).absolute()) if options.humaneval_path else None,
        "trust_remote_code": trust,
        "humaneval_timeout": options.humaneval_timeout,
        "prepare_only": prepare_only,
    }


def subprocess_env(options: Any, out: Path, gpus: int) -> dict[str, str]:
    """Offline, the compat classes importable, the data cache set, CPU threads shared out."""
    env = dict(os.environ, **OFFLINE)
    env["PYTHONPATH"] = os.pathsep.join([str(SIDE), *filter(None, [env.get("PYTHONPATH")])])
    env["COMPASS_DATA_CACHE"] = str(Path(options.data_cache).absolute()) if options.data_cache else env.get("COMPASS_DATA_CACHE") or str(out / "data_cache")
    if gpus == 0 and "OMP_NUM_THREADS" not in env:  # workers share the cores instead of each taking all
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // options.max_num_workers))
    return env


def run_driver(options: Any, out: Path, settings: dict[str, Any], env: dict[str, str]) -> Path:
    """Run the driver; return the path of its log. A config problem becomes an LlmcError.

    The driver and everything OpenCompass starts (its runner's task processes) run in a session
    of their own, so past ``opencompass.timeout`` (or on Ctrl-C) the whole group is stopped, not
    just the driver.
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("llmc_manifest.json", "llmc_effective_config.py"):  # never read an earlier run's
        (out / stale).unlink(missing_ok=True)
    settings_path = out / "llmc_settings.json"
    settings_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    python = options.python or sys.executable
    log_path = out / "llmc_opencompass.log"
    log.info("opencompass: running %s (log: %s; timeout %ss)", DRIVER.name, log_path, options.timeout)
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen([python, str(DRIVER), str(settings_path)], cwd=out, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=options.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None or timed_out:
                _stop_group(proc)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("llmc-opencompass: warning: "):
            log.warning("opencompass: %s", line.removeprefix("llmc-opencompass: warning: "))
    if timed_out:
        raise LlmcError(
            f"opencompass: OpenCompass ran past opencompass.timeout ({options.timeout:g}s) and was stopped; see {log_path}. "
            "Raise opencompass.timeout, or evaluate fewer items (opencompass.test_range)."
        )
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else str(-proc.returncode)
        hint = " (SIGKILL: often the system running out of memory)" if -proc.returncode == signal.SIGKILL else ""
        raise LlmcError(f"opencompass: OpenCompass was killed by signal {sig}{hint} before it finished; see {log_path}.")
    if proc.returncode == 3:
        msgs = [line.removeprefix("llmc-opencompass: ") for line in text.splitlines() if line.startswith("llmc-opencompass: ") and "warning:" not in line]
        raise LlmcError(*(f"opencompass.cfg_path: {m}" for m in msgs or [f"rejected; see {log_path}"]))
    if proc.returncode != 0:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
        raise LlmcError(f"opencompass: OpenCompass stopped with exit code {proc.returncode} ({last.strip()[:200]}); see {log_path}.")
    return log_path


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the driver's process group, then SIGKILL to whatever of it is left after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # nothing of the group is left
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def read_results(manifest: dict[str, Any], expected_sha: dict[str, str]) -> list[tuple[str, str, str, float, int]]:
    """``[(mode, dataset, metric, value, shards)]`` from an OpenCompass work dir.

    Raises LlmcError naming the failing task's log when a result is missing or an error, and when
    a model's inference logs do not all carry the weights fingerprint ``expected_sha[mode]``: a
    log with another fingerprint, or with none (the model class that would log it did not run),
    fails the step.
    """
    work = Path(manifest["work_dir"]) if manifest.get("work_dir") else None
    if work is None or not work.is_dir():
        raise LlmcError(f"opencompass: OpenCompass made no work dir under {Path(manifest['effective_config']).parent}; see llmc_opencompass.log there.")
    rows, problems = [], []
    for model in manifest["models"]:
        abbr, mode = model["abbr"], model["mode"]
        for dataset in manifest["datasets"]:
            preds = _prediction_files(work, abbr, dataset)
            result = work / "results" / abbr / f"{dataset}.json"
            data = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else None
            if data is None or "error" in data:
                why = f"its result says: {data['error']}" if data else "no result was written"
                problems.append(f"opencompass: {abbr} on {dataset} failed ({why}); see {_failing_log(work, abbr, dataset, preds)}")
                continue
            for key, value in data.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append((mode, dataset, key, float(value), len(preds)))
        problems += _fingerprint_problems(work, abbr, mode, expected_sha.get(mode))
    if problems:
        raise LlmcError(*problems)
    return rows


def _prediction_files(work: Path, abbr: str, dataset: str) -> list[Path]:
    folder = work / "predictions" / abbr
    whole = folder / f"{dataset}.json"
    return [whole] if whole.is_file() else sorted(folder.glob(f"{dataset}_[0-9]*.json"))


def _failing_log(work: Path, abbr: str, dataset: str, preds: list[Path]) -> Path:
    """The inference log of a shard without predictions, else the evaluation log."""
    infer = sorted((work / "logs" / "infer" / abbr).glob(f"{dataset}*.out"))
    done = {p.stem for p in preds}
    for log_file in infer:
        if log_file.stem not in done:
            return log_file
    if not preds and infer:
        return infer[0]
    eval_log = work / "logs" / "eval" / abbr / f"{dataset}.out"
    return eval_log if eval_log.exists() or not infer else infer[0]


def _logged_fingerprints(work: Path, abbr: str) -> dict[Path, set[str]]:
    """``{inference log: fingerprints it logged}`` for every inference task log of model ``abbr``."""
    return {
        log_file: {m.group(1) for m in FINGERPRINT.finditer(log_file.read_text(encoding="utf-8", errors="replace"))}
        for log_file in sorted((work / "logs" / "infer" / abbr).glob("*.out"))
    }


def _fingerprint_problems(work: Path, abbr: str, mode: str, want: str | None) -> list[str]:
    folder = work / "logs" / "infer" / abbr
    if want is None:  # a bug in llmc, not the user's: still never a pass
        return [f"opencompass: llmc has no weights fingerprint for its {mode} model, so what {abbr} evaluated is unchecked; report this as an llmc bug."]
    logged = _logged_fingerprints(work, abbr)
    if not logged:
        return [f"opencompass: {abbr} has no inference log under {folder}, so the evaluated weights are unchecked; see llmc_opencompass.log beside the work dir."]
    lines = []
    for log_file, seen in logged.items():
        if not seen:
            lines.append(
                f"opencompass: {log_file} logs no weights fingerprint ('llmc: evaluated weights sha256=...'), so the weights {abbr} "
                "evaluated are unchecked; the model was not loaded by llmc's OpenCompass model class."
            )
        elif seen != {want}:
            lines.append(f"opencompass: {abbr} evaluated weights with sha256 {', '.join(sorted(seen))} but llmc's {mode} model has {want}; see {log_file}.")
    return lines


def run_step(state: Any, options: Any) -> list[EvalRecord]:
    """Evaluate the run's models with OpenCompass; one record per (position, dataset, metric)."""
    start = time.perf_counter()
    out = output_path(state.config, options)
    models = model_folders(state, options)
    gpus = visible_gpus()
    settings = settings_for(options, out, models, gpus, trust_remote_code(state.config))
    run_driver(options, out, settings, subprocess_env(options, out, gpus))
    manifest = json.loads(Path(settings["manifest"]).read_text(encoding="utf-8"))
    rows = read_results(manifest, {m["mode"]: m["sha256"] for m in models})
    seconds = round(time.perf_counter() - start, 2)
    for mode, dataset, metric, value, shards in rows:
        log.info("opencompass: %s %s %s = %.2f (%d prediction shard(s))", mode, dataset, metric, value, shards)
    log.info("opencompass: results in %s", manifest["work_dir"])
    return [EvalRecord(mode, "opencompass", dataset, metric, value, seconds) for mode, dataset, metric, value, _ in rows]
