"""The base of every config section, low in the stack: pydantic only, no torch, no plugin API.

``StrictModel`` refuses unknown keys (a typo is an error, never a silent default); ``NoOptions``
is the config of a plugin that takes none. :mod:`llmc_core.api` re-exports both for plugins.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoOptions(StrictModel):
    """The config of a plugin that takes no options."""
