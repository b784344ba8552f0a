"""GPTQ (Hessian-based rounding with error feedback) as an llmc method plugin.

- ``method``: the :class:`Gptq` method and its ``quant.special`` config;
- ``solver``: the Hessian accumulator and the column-by-column solve for one layer.
"""

from llmc_core import hookimpl
from llmc_plugins.methods.gptq.method import Gptq

__all__ = ["Gptq"]


@hookimpl
def llmc_register_methods(register):
    register(Gptq)
