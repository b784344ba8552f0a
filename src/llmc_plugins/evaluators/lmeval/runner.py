"""Running lm-eval's tasks on the run's in-memory model at one position, and reading its results.

:func:`evaluate_at` wraps ``state.model`` (moved to the run's device, as for perplexity) and a copy
of ``state.tokenizer`` in lm-eval's ``HFLM``, loads the tasks from the index the config check built,
runs ``simple_evaluate`` and turns ``results[task]["<metric>,<filter>"]`` into
:class:`~llmc_core.results.EvalRecord` s with lm-eval's ``<metric>_stderr,<filter>`` as stderr.
lm-eval seeds Python's, NumPy's and torch's global generators; they are restored afterwards, so
the rest of the run draws the same numbers with or without this step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

from llmc_core.errors import LlmcError
from llmc_core.results import EvalRecord
from llmc_plugins.evaluators.lmeval import checks

log = logging.getLogger("llmc")


def resolve_tasks(options: Any) -> tuple[Any, list[str]]:
    """The task manager that knows every requested task, and the names with globs expanded."""
    manager = checks.manager_for(options.tasks, options.include_path)
    names: list[str] = []
    for name in options.tasks:
        names += manager.match_tasks([name]) if any(c in name for c in "*?[") else [name]
    return manager, list(dict.fromkeys(names))


def load_tasks(manager: Any, names: list[str]) -> list[Any]:
    """Build the tasks (this reads their data); a task that cannot is one LlmcError line.

    Returns what ``simple_evaluate`` takes as ``tasks``: the built leaf tasks, or the names when a
    group is among them (so lm-eval aggregates it as it would from its CLI).
    """
    try:
        loaded = manager.load(names)
    except Exception as exc:  # dataset missing offline, a broken task YAML: lm-eval raises anything
        log.debug("lm-eval could not load its tasks", exc_info=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise LlmcError(
            f"lm_eval.tasks: lm-eval could not load {', '.join(names)} ({type(exc).__name__}: {first}). "
            "Hub tasks need a network or a warm datasets cache; local tasks need their data where their YAML points."
        ) from exc
    return names if loaded["groups"] else list(loaded["tasks"].values())


@contextlib.contextmanager
def kept_rng_state():
    """Restore the global random generators lm-eval reseeds."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def records_from(results: dict[str, Any], position: str, seconds: float) -> list[EvalRecord]:
    """One record per task (and group) and numeric metric of lm-eval's ``results["results"]``.

    A metric is named as lm-eval's table names it: ``acc`` for the ``none`` filter, else
    ``<metric>,<filter>`` (e.g. ``exact_match,strict-match``).
    """
    out = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or not _is_number(value) or not filt:
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric},{filt}"
            out.append(EvalRecord(position, "lm_eval", task, name, float(value), seconds, float(stderr) if _is_number(stderr) else None))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def output_folder(state: Any, options: Any) -> Path | None:
    if options.output_path:
        return Path(options.output_path).expanduser()
    return state.config.save_path / "lm_eval" if state.config.save is not None else None


def write_outputs(folder: Path, results: dict[str, Any], position: str) -> Path:
    """lm-eval's results as ``<folder>/<position>/results.json`` (samples as JSON lines beside)."""
    from lm_eval.utils import handle_non_serializable

    target = folder / position
    target.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    for task, rows in samples.items():
        text = "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows)
        _atomic_write(target / f"samples_{task}.jsonl", text)
    path = target / "results.json"
    _atomic_write(path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    from llmc_core.fsutil import atomic_file

    with atomic_file(path, overwrite=True) as tmp:  # the section's output folder was checked at validation
        tmp.write_text(text, encoding="utf-8")


def evaluate_at(state: Any, options: Any, position: str) -> list[EvalRecord]:
    """Evaluate ``state.model`` as it is now on the configured tasks; one record per metric."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    manager, names = resolve_tasks(options)
    tasks = load_tasks(manager, names)
    state.model.to(state.device)
    # lm-eval may give the tokenizer a pad token: a copy keeps llmc's (and the saved folders') as they are
    lm = HFLM(pretrained=state.model, tokenizer=copy.deepcopy(state.tokenizer), batch_size=options.batch_size)
    with kept_rng_state(), torch.no_grad():
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            num_fewshot=options.num_fewshot,
            batch_size=options.batch_size,
            limit=options.limit,
            apply_chat_template=options.apply_chat_template,
            gen_kwargs=options.gen_kwargs,
            bootstrap_iters=options.bootstrap_iters,
            log_samples=options.log_samples,
        )
    seconds = round(time.perf_counter() - start, 2)
    if results is None:
        raise LlmcError("lm_eval: lm-eval returned no results (it reports only on the main process of a distributed launch).")
    records = records_from(results, position, seconds)
    if not records:
        raise LlmcError(f"lm_eval: lm-eval gave no numeric metric for {', '.join(names)} at {position}; check the tasks' metric_list.")
    folder = output_folder(state, options)
    if folder is not None:
        log.info("lm_eval: %s results in %s", position, write_outputs(folder, results, position))
    return records
