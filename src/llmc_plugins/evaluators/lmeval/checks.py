"""Validation of the ``lm_eval`` section, before any model loads.

Each function returns problem lines; :meth:`LmEval.check` raises them as one LlmcError. Task names
are checked against lm-eval's own task index (``lm_eval.tasks.TaskManager``, which imports
``datasets`` but not torch). The index is kept for the run, which loads its tasks from it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path
from typing import Any

from llmc_core.errors import did_you_mean
from llmc_core.fsutil import output_folder_problem

INSTALL = "pip install -e '.[lm_eval]' from an llmc checkout (or pip install 'llmc[lm_eval]')"
_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}  # (include paths, with lm-eval's tasks) -> TaskManager


def rule_problems(cfg: Any, options: Any) -> list[str]:
    """Cross-section rules: quantized positions need a quant section (and a float model)."""
    lines = []
    quantized = [m for m in options.eval_mode if m != "pretrain"]
    if quantized and cfg.quant is None:
        lines.append(f"lm_eval.eval_mode: {', '.join(quantized)} needs a quant section (or use eval_mode: [pretrain]).")
    if "transformed" in options.eval_mode and cfg.quant is not None and cfg.quant.quant_out:
        lines.append("lm_eval.eval_mode: quant.quant_out: true quantizes during the transform, so there is no float 'transformed' model; remove 'transformed'.")
    if "real_quant" in options.eval_mode and getattr(cfg, "scheme", None) is not None:
        from llmc_core.quant.rules import real_quant_problems

        lines += [f"lm_eval.eval_mode: real_quant: {p}. Use fake_quant instead." for p in real_quant_problems(cfg.scheme)]
    problem = output_folder_problem("lm_eval.output_path", options.output_path, cfg, "lm-eval results")
    if problem:
        lines.append(problem)
    return lines


def include_path_problems(include_path: list[str] | None) -> list[str]:
    lines = []
    for p in include_path or []:
        if not Path(p).expanduser().is_dir():
            lines.append(f"lm_eval.include_path: {p} is not a folder. Give the folder that holds your task YAML files (e.g. configs/lm_eval).")
    return lines


def install_problems() -> list[str]:
    if importlib.util.find_spec("lm_eval") is None:
        return [f"lm_eval: lm-eval is not installed in this Python. Install the lm_eval step with: {INSTALL}."]
    return []


def task_manager(include_path: list[str] | None, defaults: bool = True) -> Any:
    """lm-eval's ``TaskManager`` over ``include_path`` (and its own tasks when ``defaults``), built once."""
    key = (tuple(str(Path(p).expanduser().resolve()) for p in include_path or []), defaults)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[key] = TaskManager(include_path=list(key[0]) or None, include_defaults=defaults)
    return _MANAGERS[key]


def manager_for(tasks: list[str], include_path: list[str] | None) -> Any:
    """The task manager to load ``tasks`` from: ``include_path``'s alone when it has them all
    (indexing lm-eval's own ~15k tasks takes seconds, and a run of local tasks does not need them),
    else ``include_path``'s and lm-eval's."""
    if include_path:
        local = task_manager(include_path, defaults=False)
        if not unknown_tasks(tasks, local):
            return local
    return task_manager(include_path)


def task_problems(tasks: list[str], include_path: list[str] | None) -> list[str]:
    """Every task name is a task, group or tag lm-eval knows, a glob matching some, or a YAML file."""
    manager = manager_for(tasks, include_path)
    lines = []
    for name in unknown_tasks(tasks, manager):
        where = f" or in {', '.join(include_path)}" if include_path else ""
        lines.append(
            f"lm_eval.tasks: unknown task '{name}'.{did_you_mean(name, manager.all_tasks)} It is not an lm-eval task, group or tag{where}; "
            "'lm_eval ls tasks' lists them, and local task YAMLs go in a folder named by lm_eval.include_path."
        )
    return lines


def unknown_tasks(tasks: list[str], manager: Any) -> list[str]:
    """The names in ``tasks`` that ``manager`` cannot load."""
    known = manager.all_tasks
    index = set(known)
    out = []
    for name in tasks:
        if name in index or (Path(name).suffix in (".yaml", ".yml") and Path(name).expanduser().is_file()):
            continue
        if any(c in name for c in "*?[") and fnmatch.filter(known, name):
            continue
        out.append(name)
    return out
