"""Built-in datasets (wikitext2, c4, pileval, ultrachat, custom) and calibration preprocessors."""

from llmc_core import hookimpl
from llmc_core.errors import LlmcError
from llmc_plugins.data.corpora import C4, Custom, PileVal, UltraChat, WikiText2
from llmc_plugins.data.preprocs import PilevalAwq, PilevalOmni, PilevalSmooth, RandomTruncateTxt, RandomWindow, TxtGeneral, UltrachatGeneral, WikiText2Gptq

PREPROCS = (PilevalAwq, RandomWindow, TxtGeneral, PilevalSmooth, WikiText2Gptq, RandomTruncateTxt, PilevalOmni, UltrachatGeneral)


@hookimpl
def llmc_register_datasets(register):
    for cls in (WikiText2, C4, PileVal, UltraChat, Custom):
        register(cls)


@hookimpl
def llmc_register_preprocs(register):
    for cls in PREPROCS:
        register(cls)


@hookimpl
def llmc_run_start(run):
    """Refuse, before the model loads, a batch size that would join samples of different lengths:
    ``Run.load_calibration`` concatenates ``calib.bs`` samples into one tensor with no padding
    mask, which only samples of one length allow."""
    cfg = run.config
    c = cfg.calib
    if c is None or cfg.method is None or not cfg.method.needs_calibration:
        return
    preproc = run.manager.get("preproc", c.preproc, "calib.preproc")
    if not getattr(preproc, "same_length", True) and c.bs != 1 and c.n_samples > 1:
        raise LlmcError(
            f"calib.bs: {c.bs} joins samples into batches, but calib.preproc {c.preproc} gives samples of different lengths "
            "(documents cut to at most calib.seq_len tokens, never padded). Set calib.bs: 1, as ModelTC's configs for it do."
        )
