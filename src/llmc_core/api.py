"""Base classes for every kind of plugin.

Each plugin class carries a class attribute ``name`` (what the config selects, matched
case-insensitively) and a pydantic ``Config`` (``extra="forbid"``) that validates its YAML section.
Nothing here imports torch at module level, so listing and validating plugins stays cheap.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from llmc_core.schema import NoOptions, StrictModel

__all__ = ["DOWNSTREAM", "Dataset", "Evaluator", "Method", "ModelFamily", "NoOptions", "Plugin", "Preproc", "Saver", "Step", "StrictModel"]

if TYPE_CHECKING:
    import torch

    from llmc_core.adapters import ModelAdapter
    from llmc_core.blockwise import BlockContext
    from llmc_core.preflight import ModelShapes, Part
    from llmc_core.quant import QuantSpec
    from llmc_core.quant.scheme import Scheme
    from llmc_core.results import EvalRecord
    from llmc_core.state import RunState

log = logging.getLogger("llmc")

DOWNSTREAM = "downstream"  # the position of a step that runs once, after the savers


class Plugin:
    """Common shape of a registered plugin class."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[BaseModel]] = NoOptions
    path_keys: ClassVar[tuple[str, ...]] = ()  # keys of its section holding file paths (``pkg:``, ``~`` expanded)

    @classmethod
    def summary(cls) -> str:
        """The docstring's first paragraph on one line (what ``llmc plugins`` shows)."""
        doc = (cls.__doc__ or "").strip()
        return " ".join(re.split(r"\n\s*\n", doc, maxsplit=1)[0].split())


class ModelFamily(Plugin):
    """A family of decoder-only models (``model.type``): how to load it and how to walk it."""

    def load(self, config: Any) -> tuple[torch.nn.Module, Any]:
        """Load ``(model, tokenizer)`` from the validated model section."""
        raise NotImplementedError

    def adapter(self, model: torch.nn.Module) -> ModelAdapter:
        """The :class:`~llmc_core.adapters.ModelAdapter` describing ``model``'s blocks and layers."""
        raise NotImplementedError


class Dataset(Plugin):
    """A text corpus used for calibration (``calib.name``) or evaluation (``eval.name``)."""

    def load_rows(self, path: str | None, download: bool, purpose: str) -> list[str]:
        """Return the corpus as rows of text.

        :param path: the file or folder from the config (already expanded), or None.
        :param download: fetch from the hub (``path`` is then None); the core has already resolved
            the config's ``download: auto`` to True or False.
        :param purpose: ``"calib"`` or ``"eval"`` (datasets pick their split from it).
        """
        raise NotImplementedError

    def read_rows(self, path: str | None, download: bool | str, purpose: str, where: str) -> list[str]:
        """:meth:`load_rows` for the config's ``path`` and ``download`` (``false``, ``true`` or
        ``"auto"``), logging where the rows came from.

        ``download: true`` fetches from the hub; ``"auto"`` reads ``path`` when it exists and fetches
        otherwise; ``false`` reads ``path`` only. A file that cannot be read as text (a folder, binary
        or non-UTF-8 bytes, no permission) or that holds no text is reported as one line naming
        ``where`` (e.g. ``calib.path``).
        """
        from llmc_core.errors import LlmcError

        local = bool(path) and Path(path).exists()
        fetch = download is True or (download == "auto" and not local)
        if fetch:
            log.info("%s: fetching the %s dataset from the hub (download: %s%s)", where, self.name, str(download).lower(), f"; {path} does not exist" if path and not local else "")
        elif download == "auto":
            log.info("%s: reading %s (download: auto, found locally)", where, path)
        try:
            rows = self.load_rows(None if fetch else path, fetch, purpose)
        except (UnicodeDecodeError, OSError) as exc:
            what = f"is not UTF-8 text ({exc.reason} at byte {exc.start})" if isinstance(exc, UnicodeDecodeError) else f"cannot be read ({exc.strerror or exc})"
            raise LlmcError(f"{where}: {path} {what}. Point it at a text file of the {self.name} dataset's format.") from exc
        if not any(isinstance(r, str) and r.strip() for r in rows):  # fail here, not after the model has loaded
            source = path or f"the downloaded {self.name} data"
            raise LlmcError(f"{where}: {source} holds no documents (no row of text). Point it at a non-empty file of the {self.name} dataset's format.")
        return rows


class Preproc(Plugin):
    """Turns dataset rows into calibration samples of token ids."""

    def samples(self, rows: list[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
        """Return ``n_samples`` tensors of shape ``[1, seq_len]`` (int64 token ids)."""
        raise NotImplementedError


class Method(Plugin):
    """A compression method (``quant.method``), applied one decoder block at a time.

    The lifecycle, in order: :meth:`check` at config validation (before the model loads);
    :meth:`check_model` once after the model loads; :meth:`transform_model` once (a whole-model
    step; default: nothing); :meth:`transform_block` for each block with its
    cached inputs (only when :attr:`needs_calibration`); :meth:`quantize_block` for each block
    (right after ``transform_block`` with ``quant.quant_out: true``, else in a later pass);
    :meth:`finish` once after the last block call. With block checkpoints the runner keeps
    :meth:`state_dict` after each block and a resumed run hands it to :meth:`load_state_dict`
    before the next block. ``quant.special`` is validated against ``Config``.
    """

    needs_calibration: ClassVar[bool] = True
    scheme: Scheme | None = None  # the run's whole scheme, set by the runner after __init__ (``weight`` is ``scheme.weight``)

    def __init__(self, options: BaseModel, weight: QuantSpec):
        self.options = options
        self.weight = weight
        self.log: list[dict[str, Any]] = []

    @classmethod
    def accepts(cls, scheme: Scheme) -> list[str]:
        """Why this method cannot produce ``scheme`` (empty list: it can). Called at validation.

        The default is what every method did before schemes existed: integer weights, no
        activation or KV cache quantization. A method whose ``quantize_block`` rounds through
        :mod:`llmc_core.quant` (which knows every scheme) overrides it to accept more; activation
        and KV quantizers are the runner's, not the method's.
        """
        if scheme.integer_weight_only:
            return []
        return [f"this method quantizes integer weights only, not {scheme.describe()}; use RTN or GPTQ for float or activation schemes."]

    @classmethod
    def check(cls, run_config: Any) -> None:
        """Raise :class:`~llmc_core.errors.LlmcError` if the run's settings cannot work, e.g. a file
        the method would write exists and ``save.overwrite`` is false. Called at validation."""

    @classmethod
    def memory(cls, shapes: ModelShapes, options: BaseModel, samples: int, seq_len: int) -> list[Part]:
        """What one block's ``transform_block`` holds at its peak besides the runner's (the block's
        inputs and outputs, one forward slice), for the memory preflight (:mod:`llmc_core.preflight`),
        from the model's ``shapes`` and this rank's ``samples`` calibration samples of ``seq_len`` tokens: e.g. kept layer
        inputs, Hessians, search buffers. Called before the model loads; no torch. Default: nothing."""
        return []

    def check_model(self, adapter: ModelAdapter) -> None:
        """Raise :class:`~llmc_core.errors.LlmcError` if the method cannot handle this model."""
        from llmc_core.quant import check_divisible
        from llmc_core.weights import announce_weights

        announce_weights(adapter, self.name)  # logs the counts by kind; refuses a model with nothing to quantize
        check_divisible(self.weight, adapter.named_quant_linears())

    @classmethod
    def transform_problems(cls, options: BaseModel) -> list[str]:
        """Why this method cannot run with ``options`` as a transform of a recipe, before another
        method quantizes (empty list: it can). E.g. a clipping that happens at quantization time
        would be lost. Called at validation for every method of ``quant.method: [...]`` but the last."""
        return []

    def transform_model(self, adapter: ModelAdapter, device: torch.device) -> None:
        """A whole-model step, once before the block pass (rotations, embedding-level
        transforms): change ``adapter.model`` in place. The default does nothing. A resumed run
        calls it again before restoring the finished blocks, so it must be deterministic (seed
        from the config, never from the clock)."""

    def transform_block(self, ctx: BlockContext) -> None:
        """Apply equivalent transformations (and weight clipping) to ``ctx.block`` in place."""

    def quantize_block(self, ctx: BlockContext) -> dict[str, Any]:
        """Fake-quantize every linear layer of ``ctx.block`` in place.

        Returns ``{layer name: QuantizedWeight}`` so savers can pack the integers. The default is
        round-to-nearest through :mod:`llmc_core.quant`.
        """
        from llmc_core.quant import fake_quantize_linear

        out = {}
        for name, linear in ctx.adapter.quant_linears(ctx.block).items():
            out[f"{ctx.prefix}.{name}"] = fake_quantize_linear(linear, self.weight)
        return out

    def finish(self, overwrite: bool) -> None:
        """Called once after the method's last block call (the quantize pass, or the block loop
        with ``quant.quant_out: true``), also in a resumed run: write end-of-run files here.
        ``overwrite``: whether such files may replace existing ones (``save.overwrite``, or a
        resumed run, which may have written them before it was interrupted)."""

    def state_dict(self) -> dict[str, Any]:
        """What this object carries from one block to the next (e.g. scales found so far), as a
        dict of tensors and JSON values (nested dicts and lists allowed). The block checkpoint
        keeps it after each block; the default says there is nothing (``self.log`` is kept by the
        runner). A method that keeps other attributes must override it, or --resume refuses."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned (tensors on the CPU), before the first block
        of a resumed run."""


class Evaluator(Plugin):
    """Measures the model at the positions named in ``eval.eval_pos`` (``eval.type``)."""

    def evaluate(self, state: RunState, config: Any, position: str) -> list[EvalRecord]:
        """Evaluate ``state.model`` and return one record per metric."""
        raise NotImplementedError

    @classmethod
    def memory(cls, shapes: ModelShapes, config: Any, again: bool = False) -> list[Part]:
        """What one evaluation holds besides the model's weights (e.g. logits), for the memory
        preflight (:mod:`llmc_core.preflight`), from the model's ``shapes``; ``again``: this
        section was measured before in the run (what it cached then is not made again). Default: nothing."""
        return []


class Step(Plugin):
    """A downstream evaluation that owns a top-level config section (``opencompass``, ``lm_eval``).

    The section named :attr:`section` (default: the step's ``name``) is validated against
    ``Config``; :meth:`check` then sees the whole validated run config. At each position that
    :meth:`positions` returns, the run calls :meth:`evaluate`: at a model position (``pretrain``,
    ``transformed``, ``fake_quant``, ``real_quant``) right after the ``eval`` sections there, or
    at :data:`DOWNSTREAM`, once after the savers (the saved folders are in ``state.saved``).
    """

    section: ClassVar[str] = ""

    @classmethod
    def section_name(cls) -> str:
        """The top-level config key this step owns."""
        return cls.section or cls.name

    def check(self, run_config: Any, options: Any) -> None:
        """Raise :class:`~llmc_core.errors.LlmcError` (every problem, one line each) if the section
        cannot work with this run config. Called at validation, before any model loads."""

    @staticmethod
    def positions(options: Any) -> list[str]:
        """The positions at which the run calls :meth:`evaluate` (default: once after the savers)."""
        return [DOWNSTREAM]

    def evaluate(self, state: RunState, options: Any, position: str) -> list[EvalRecord]:
        """Evaluate the run's model at ``position``; return one record per metric."""
        raise NotImplementedError


class Saver(Plugin):
    """Writes the model at one position into ``save.save_path/<folder>`` (``save.save_<name>``).

    The core hands :meth:`save` a fresh temporary folder and renames it into place when it returns,
    so a saver never deals with partial writes or existing folders. ``llmc export`` calls a
    ``fake_quant`` saver's :meth:`save` with a :class:`~llmc_core.state.ModelState` (``model``,
    ``tokenizer``, ``quantized``, rebuilt from a saved ``fake_quant_model``) in place of the run's
    state, and :meth:`check` with an :class:`~llmc_core.export.ExportConfig` (``weight``: the saved spec).
    """

    folder: ClassVar[str] = ""
    position: ClassVar[str] = "fake_quant"  # "transformed" or "fake_quant"
    keeps_qparams: ClassVar[bool] = False  # its folder holds what ``llmc export`` rebuilds the quantized layers from

    @classmethod
    def accepts(cls, scheme: Scheme) -> list[str]:
        """Why this saver's format cannot store ``scheme`` (empty list: it can). Called at
        validation (and by ``llmc export``) for savers of the ``fake_quant`` position, before
        :meth:`check`. The default accepts what every saver handled before schemes: integer
        weights, no activation or KV cache quantization; a format that stores more overrides it."""
        if scheme.integer_weight_only:
            return []
        return [f"this format stores integer weights only, not {scheme.describe()}. Save with save_fake or save_vllm instead."]

    @classmethod
    def fit_scheme(cls, scheme: Scheme) -> Scheme:
        """The scheme the run quantizes on so that this format stores it exactly: ``scheme`` itself
        (the default), or one on a narrower grid the format needs (GGUF: float16 scales and mins).
        Called at validation, before :meth:`accepts`, for savers of the ``fake_quant`` position;
        it may only narrow the grid (every saver's fit is applied in turn), never change the
        bits, granularity or activation scheme the user asked for."""
        return scheme

    def check(self, run_config: Any) -> None:
        """Raise :class:`~llmc_core.errors.LlmcError` if the run's settings cannot be saved."""

    def check_model(self, adapter: ModelAdapter) -> None:
        """Raise :class:`~llmc_core.errors.LlmcError` if the format cannot hold this model (e.g.
        fused MoE experts in a packed int4 layout). Called once the model has loaded, before any
        evaluation or calibration."""

    def save(self, state: RunState, folder: str) -> None:
        """Write the model of ``state`` (``state.model``, ``state.tokenizer``, ``state.quantized``) into ``folder``."""
        raise NotImplementedError
