"""``llmc export SAVE_PATH --to NAME``: write a real-int format from a saved ``fake_quant_model``.

The fake-quantized folder holds the dequantized weights and, beside them, the scales and zero
points (:mod:`llmc_core.quant.stored`); together they give the integer codes back exactly, so any
saver of the ``fake_quant`` position (``vllm``, ``awq``, or a plugin's) can write its folder
into ``SAVE_PATH/<its folder>`` as if the run had asked for it, with no calibration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc_core.errors import LlmcError, damaged_file_errors, first_line
from llmc_core.state import ModelState

log = logging.getLogger("llmc")

FAKE_FOLDER = "fake_quant_model"


ExportState = ModelState  # what a saver reads of a run (model, tokenizer, quantized), rebuilt from disk


@dataclass
class ExportConfig:
    """What a saver's ``check(run_config)`` reads at export: the saved spec as ``weight``; no
    ``quant``, ``save`` or method section (the run that wrote the folder was validated already)."""

    weight: Any
    quant: Any = None
    save: Any = None
    special: Any = None
    resume: bool = False

    def positions(self, steps: bool = False) -> set[str]:
        return set()


def export_targets(manager: Any) -> list[str]:
    """Saver names ``--to`` accepts: every ``fake_quant`` saver but ``fake`` itself."""
    return [n for n in manager.names("saver") if n != "fake" and manager.get("saver", n, "--to").position == "fake_quant"]


def export(save_path: str | Path, to: str, overwrite: bool = False, manager: Any = None) -> Path:
    """Write ``save_path/<folder of saver 'to'>`` from ``save_path/fake_quant_model``; return it."""
    from llmc_core.fsutil import atomic_folder
    from llmc_core.plugins import get_manager

    manager = manager or get_manager()
    save_path = Path(save_path).expanduser()
    targets = export_targets(manager)
    if to.lower() not in targets:
        raise LlmcError(f"--to {to}: llmc exports to {', '.join(targets)} (savers of quantized weights; 'llmc plugins' lists them).")
    saver_cls = manager.get("saver", to, "--to")
    fake = save_path / FAKE_FOLDER
    if not (fake / "config.json").is_file():
        raise LlmcError(f"{save_path}: no {FAKE_FOLDER}/ with a config.json; give the save_path of a run that had save.save_fake: true.")
    target = save_path / saver_cls.folder
    if target.exists() and not overwrite:
        raise LlmcError(f"{target} already exists; llmc never overwrites a folder silently. Remove it or pass --overwrite.")
    state = load_fake_folder(fake)
    spec = next(iter(state.quantized.values())).spec
    saver = saver_cls()
    saver.check(ExportConfig(weight=spec))  # the same refusals as in a run's config validation
    with atomic_folder(target, overwrite=overwrite) as tmp:
        saver.save(state, str(tmp))
    log.info("exported %s model to %s (%d quantized layers, %s)", saver_cls.name, target, len(state.quantized), spec.describe())
    return target


def load_fake_folder(folder: Path) -> ModelState:
    """The model (in its saved dtype), tokenizer and quantized layers of a ``fake_quant_model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc_core.quant.stored import read_quantized

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=False).eval()
    except damaged_file_errors() as exc:
        raise LlmcError(f"{folder}: could not be loaded as a causal LM ({first_line(exc)}).") from exc
    quantized = read_quantized(folder, model)
    if not quantized:
        raise LlmcError(f"{folder}: the run quantized no layer, so there is nothing to export.")
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return ModelState(model, tokenizer, quantized)
