"""Hugging Face decoder-only model families (one table each, see ``families.py``) and ``auto``."""

from llmc_core import hookimpl
from llmc_plugins.models.families import FAMILIES, Auto


@hookimpl
def llmc_register_models(register):
    for family in FAMILIES:
        register(family)
    register(Auto)
