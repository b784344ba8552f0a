"""The one user-facing error type.

Anything the user can fix (a config mistake, a missing file, an unknown plugin name, a model the
method cannot map) is raised as :class:`LlmcError`. The CLI renders it as one line per problem and
exits with :data:`USER_ERROR_EXIT`; it never shows a traceback for it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

USER_ERROR_EXIT = 2


class LlmcError(Exception):
    """A problem the user can fix. ``problems`` holds one line per problem."""

    def __init__(self, *problems: str, kind: str = "error"):
        self.problems = [p for p in problems if p]
        self.kind = kind
        super().__init__("\n".join(self.problems))

    def render(self) -> str:
        prefix = "llmc: " if self.kind == "error" else f"llmc: {self.kind}: "
        return "\n".join(prefix + p for p in self.problems)


class ConfigSyntaxError(LlmcError):
    """The YAML file itself cannot be parsed."""

    def __init__(self, problem: str):
        super().__init__(problem, kind="YAML syntax error")


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none): what an error line
    quotes of a library's exception."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def damaged_file_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or refused model file raises: ``OSError``, ``ValueError``,
    ``EOFError``, ``struct.error`` (a GGUF cut inside its header), ``pickle.UnpicklingError`` (a
    pickle ``torch.load(weights_only=True)`` refuses) and safetensors' ``SafetensorError``."""
    import pickle
    import struct

    errors: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, struct.error, pickle.UnpicklingError)
    try:
        from safetensors import SafetensorError
    except ImportError:
        return errors
    return (*errors, SafetensorError)


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return `` Did you mean 'x'?`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(value).lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_name(kind: str, value: str, where: str, available: Iterable[str]) -> LlmcError:
    """The standard error for a name that no registered plugin provides."""
    names = sorted(available)
    return LlmcError(
        f"Unknown {kind} '{value}' at {where}. Available: {', '.join(names) or 'none'}."
        f"{did_you_mean(value, names)} If it comes from a plugin, is it installed? "
        "'llmc plugins' lists them."
    )
