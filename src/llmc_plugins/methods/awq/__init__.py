"""AWQ (activation-aware weight quantization) as an llmc method plugin.

- ``method``: the :class:`Awq` method and its ``quant.special`` config;
- ``capture``: hooks that collect inputs, statistics and outputs from one block forward;
- ``scale_search``: the scale grid, its batched loss evaluation and the folding of scales;
- ``clip``: the weight-clipping search.
"""

from llmc_core import hookimpl
from llmc_plugins.methods.awq.method import Awq

__all__ = ["Awq"]


@hookimpl
def llmc_register_methods(register):
    register(Awq)
