"""Reading a config file, before any validation: the YAML itself (syntax errors with line and
column), dotted ``key=value`` overrides, and ``${VAR:-default}`` / ``pkg:`` expansion of the path
keys. :mod:`llmc_core.config` validates what these return.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmc_core.errors import ConfigSyntaxError, LlmcError
from llmc_core.paths import expand_vars, resolve_package_path

SECTIONS = ("base", "model", "calib", "eval", "quant", "save")  # and one per registered step (api.Step)
# The core sections' path keys; a plugin names its own in ``Plugin.path_keys`` (e.g. AWQ's scale_path).
PATH_KEYS = ("path", "tokenizer_path", "save_path")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LlmcError(f"Config file not found: {p}. Pass the path of a YAML config (see configs/).")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigSyntaxError(f"{where}: {problem}. Fix the YAML (indentation, a missing ':' or quote).") from exc
    if not isinstance(data, dict):
        raise LlmcError(f"{p}: the config must be a mapping of sections ({', '.join(SECTIONS)}, ...), got {type(data).__name__}.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``a.b.c=value`` overrides in place; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LlmcError(f"Override '{item}' is not of the form section.key=value (e.g. eval.num_samples=3).")
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise LlmcError(f"Override '{item}': {'.'.join(parts[: i + 1])} is not a section.")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value
        if isinstance(node, list):
            for section in node:  # eval.x=... on a list of eval sections sets it on each
                section[parts[-1]] = parsed
        else:
            node[parts[-1]] = parsed


def expand(node: Any, where: str, path_keys: tuple[str, ...] = PATH_KEYS) -> Any:
    """``${VAR:-default}`` in every string; ``pkg:`` and ``~`` in the values of ``path_keys``."""
    if isinstance(node, dict):
        return {k: expand(v, f"{where}.{k}" if where else str(k), path_keys) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(v, f"{where}.{i}", path_keys) for i, v in enumerate(node)]
    if isinstance(node, str):
        value = expand_vars(node, where)
        if where.rsplit(".", 1)[-1] in path_keys:
            value = str(Path(resolve_package_path(value, where)).expanduser()) if value else value
        return value
    return node
