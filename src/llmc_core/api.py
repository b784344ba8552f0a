"""Base classes for every kind of plugin.

Each plugin class carries a class attribute ``name`` (what the config selects, matched
case-insensitively) and a pydantic ``Config`` (``extra="forbid"``) that validates its YAML section.
Nothing here imports torch at module level, so listing and validating plugins stays cheap.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

    from llmc_core.adapters import ModelAdapter
    from llmc_core.blockwise import BlockContext
    from llmc_core.quant import QuantSpec
    from llmc_core.results import EvalRecord
    from llmc_core.run import Run


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoOptions(StrictModel):
    """The config of a plugin that takes no options."""


class Plugin:
    """Common shape of a registered plugin class."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[BaseModel]] = NoOptions

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
        :param download: whether fetching from a hub is allowed.
        :param purpose: ``"calib"`` or ``"eval"`` (datasets pick their split from it).
        """
        raise NotImplementedError

    def read_rows(self, path: str | None, download: bool, purpose: str, where: str) -> list[str]:
        """:meth:`load_rows`, with a file that cannot be read as text (a folder, binary or
        non-UTF-8 bytes, no permission) reported as one line naming ``where`` (e.g. ``calib.path``)."""
        from llmc_core.errors import LlmcError

        try:
            return self.load_rows(path, download, purpose)
        except (UnicodeDecodeError, OSError) as exc:
            what = f"is not UTF-8 text ({exc.reason} at byte {exc.start})" if isinstance(exc, UnicodeDecodeError) else f"cannot be read ({exc.strerror or exc})"
            raise LlmcError(f"{where}: {path} {what}. Point it at a text file of the {self.name} dataset's format.") from exc


class Preproc(Plugin):
    """Turns dataset rows into calibration samples of token ids."""

    def samples(self, rows: list[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
        """Return ``n_samples`` tensors of shape ``[1, seq_len]`` (int64 token ids)."""
        raise NotImplementedError


class Method(Plugin):
    """A compression method (``quant.method``), applied one decoder block at a time.

    The runner calls :meth:`check_model` once after the model loads, :meth:`transform_block` for
    each block with its cached inputs (only when :attr:`needs_calibration`), and later
    :meth:`quantize_block` for each block. ``quant.special`` is validated against ``Config``.
    """

    needs_calibration: ClassVar[bool] = True

    def __init__(self, options: BaseModel, weight: QuantSpec):
        self.options = options
        self.weight = weight
        self.log: list[dict[str, Any]] = []

    def check_model(self, adapter: ModelAdapter) -> None:
        """Raise :class:`~llmc_core.errors.LlmcError` if the method cannot handle this model."""
        from llmc_core.quant import check_divisible
        from llmc_core.weights import announce_weights

        announce_weights(adapter, self.name)  # logs the counts by kind; refuses a model with nothing to quantize
        check_divisible(self.weight, adapter.named_quant_linears())

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


class Evaluator(Plugin):
    """Measures the model at the positions named in ``eval.eval_pos`` (``eval.type``)."""

    def evaluate(self, run: Run, config: Any, position: str) -> list[EvalRecord]:
        """Evaluate ``run.model`` and return one record per metric."""
        raise NotImplementedError


class Saver(Plugin):
    """Writes the model at one position into ``save.save_path/<folder>`` (``save.save_<name>``).

    The core hands :meth:`save` a fresh temporary folder and renames it into place when it returns,
    so a saver never deals with partial writes or existing folders.
    """

    folder: ClassVar[str] = ""
    position: ClassVar[str] = "fake_quant"  # "transformed" or "fake_quant"

    def check(self, run_config: Any) -> None:
        """Raise :class:`~llmc_core.errors.LlmcError` if the run's settings cannot be saved."""

    def save(self, run: Run, folder: str) -> None:
        raise NotImplementedError
