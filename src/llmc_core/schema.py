"""The base of every config section, low in the stack: pydantic only, no torch, no plugin API.

``StrictModel`` refuses unknown keys (a typo is an error, never a silent default); ``NoOptions``
is the config of a plugin that takes none. :mod:`llmc_core.api` re-exports both for plugins.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, and values are not coerced
    (pydantic's strict mode): ``"32"``, ``4.0`` for an integer and ``"yes"`` for a boolean are
    refused, not silently converted. An integer is still a valid float. A field that means to
    take several types says so in its annotation (``int | str``), or opts out with
    ``Field(strict=False)``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class NoOptions(StrictModel):
    """The config of a plugin that takes no options."""


def reject_unsupported(data: Any, unsupported: dict[str, str], owner: str) -> Any:
    """For a ``mode="before"`` validator: refuse any key of ``unsupported`` (key -> why) in
    ``data`` with ``'<key>' is not supported by <owner>: <why>``; return ``data`` otherwise."""
    if isinstance(data, dict):
        for key, why in unsupported.items():
            if key in data:
                raise ValueError(f"'{key}' is not supported by {owner}: {why}")
    return data


def unique(value: list[str]) -> list[str]:
    """For a list-of-positions field validator: each entry once."""
    if len(set(value)) != len(value):
        raise ValueError("list each position once")
    return value
