"""Built-in datasets (wikitext2, c4, pileval, custom) and calibration preprocessors."""

from llmc_core import hookimpl
from llmc_plugins.data.corpora import C4, Custom, PileVal, WikiText2
from llmc_plugins.data.preprocs import PilevalAwq, RandomWindow


@hookimpl
def llmc_register_datasets(register):
    for cls in (WikiText2, C4, PileVal, Custom):
        register(cls)


@hookimpl
def llmc_register_preprocs(register):
    register(PilevalAwq)
    register(RandomWindow)
