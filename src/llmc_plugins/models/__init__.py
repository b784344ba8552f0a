"""Hugging Face decoder-only model families (Llama, Mistral, Qwen2, SmolLM2)."""

from llmc_core import hookimpl
from llmc_plugins.models.families import FAMILIES


@hookimpl
def llmc_register_models(register):
    for family in FAMILIES:
        register(family)
