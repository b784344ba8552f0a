"""llmc core: the plugin system, the strict config, and the block-wise run.

Plugins write ``from llmc_core import hookimpl`` and never import pluggy themselves.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("llmc")
hookspec = pluggy.HookspecMarker("llmc")

from llmc_core.errors import LlmcError  # noqa: E402

__all__ = ["LlmcError", "__version__", "hookimpl", "hookspec"]
