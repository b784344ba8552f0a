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



ExportState = ModelState  # what a saver reads of a run (model, tokenizer, quantized), rebuilt from disk


@dataclass
class ExportConfig:
    """What a saver's ``check(run_config)`` reads at export: the saved spec as ``weight``; no
    ``quant``, ``save`` or method section (the run that wrote the folder was validated already)."""

    weight: Any
    scheme: Any = None
    quant: Any = None
    save: Any = None
    special: Any = None
    resume: bool = False

    def positions(self, steps: bool = False) -> set[str]:
        return set()


def export_targets(manager: Any) -> list[str]:
    """Saver names ``--to`` accepts: every ``fake_quant`` saver but the one export reads from
    (the saver whose folder keeps the quantization parameters, ``Saver.keeps_qparams``)."""
    savers = [manager.get("saver", n, "--to") for n in manager.names("saver")]
    return [s.name for s in savers if s.position == "fake_quant" and not s.keeps_qparams]


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
    source = next(manager.get("saver", n, "--to") for n in manager.names("saver") if manager.get("saver", n, "--to").keeps_qparams)
    fake = save_path / source.folder
    if not (fake / "config.json").is_file():
        raise LlmcError(f"{save_path}: no {source.folder}/ with a config.json; give the save_path of a run that had save.save_{source.name}: true.")
    from llmc_core.outlock import hold

    target = save_path / saver_cls.folder
    with hold(save_path, what="SAVE_PATH"):  # no run (or other export) writes there meanwhile
        if target.exists() and not overwrite:
            raise LlmcError(f"{target} already exists; llmc never overwrites a folder silently. Remove it or pass --overwrite.")
        state = load_fake_folder(fake)
        spec = next(iter(state.quantized.values())).spec
        refusals = saver_cls.accepts(state.scheme)  # the same refusals as in a run's config validation
        if refusals:
            raise LlmcError(*(f"--to {to}: {p}" for p in refusals))
        saver = saver_cls()
        saver.check(ExportConfig(weight=spec, scheme=state.scheme))
        with atomic_folder(target, overwrite=overwrite) as tmp:
            saver.save(state, str(tmp))
    log.info("exported %s model to %s (%d quantized layers, %s)", saver_cls.name, target, len(state.quantized), spec.describe())
    return target


def load_fake_folder(folder: Path) -> ModelState:
    """The model (in its saved dtype), tokenizer and quantized layers of a ``fake_quant_model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc_core.quant.stored import read_quantized, read_scheme

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=False).eval()
    except damaged_file_errors() as exc:
        raise LlmcError(f"{folder}: could not be loaded as a causal LM ({first_line(exc)}).") from exc
    quantized = read_quantized(folder, model)
    if not quantized:
        raise LlmcError(f"{folder}: the run quantized no layer, so there is nothing to export.")
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        try:  # never the folder's own code: a tokenizer_config.json with an auto_map is refused, not run
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LlmcError(f"{folder}: its tokenizer could not be loaded without running code from the folder ({first[:300]}).") from exc
    scheme, act_scales, kv_scales = read_scheme(folder)
    return ModelState(model, tokenizer, quantized, scheme=scheme, act_scales=act_scales, kv_scales=kv_scales)
