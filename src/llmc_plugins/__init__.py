"""llmc's built-in plugins. They register through the ``llmc`` entry-point group exactly as a
third-party package does; ``DEFAULT_PLUGINS`` is the fallback when llmc runs from an uninstalled
source tree (and must list the same modules as ``pyproject.toml``'s entry points)."""

DEFAULT_PLUGINS = (
    "llmc_plugins.models",
    "llmc_plugins.data",
    "llmc_plugins.methods.rtn",
    "llmc_plugins.methods.awq",
    "llmc_plugins.methods.gptq",
    "llmc_plugins.methods.smoothquant",
    "llmc_plugins.evaluators.ppl",
    "llmc_plugins.evaluators.opencompass",
    "llmc_plugins.evaluators.lmeval",
    "llmc_plugins.savers",
)
