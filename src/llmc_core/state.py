"""``RunState``: what plugins, savers, the block checkpoint and the report read and write of a run.

Low in the stack (no torch, no other llmc module at run time), so everything above it is typed
against this protocol instead of the concrete :class:`llmc_core.run.Run`, and only the CLI and
``run.py`` need ``Run``. ``Run`` implements it; :class:`ModelState` is a small stand-in for code
that holds a model outside a run (``llmc export``, the pretrain model OpenCompass evaluates).

Hooks keep the argument name ``run`` (pluggy matches implementations by argument name), and
plugin methods receive the state positionally, so a plugin written as ``save(self, run, folder)``
keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from llmc_core.adapters import ModelAdapter
    from llmc_core.api import Method
    from llmc_core.config import RunConfig
    from llmc_core.layer_error import LayerErrors
    from llmc_core.plugins import PluginManager
    from llmc_core.quant import QuantizedWeight
    from llmc_core.results import EvalRecord


class RunState(Protocol):
    """The state of one run as plugins see it. Stages fill it in order: ``config`` first; the
    model, tokenizer, adapter and device when the model loads; ``calib_batches`` before the
    calibration pass; ``quantized`` block by block; ``results`` and ``saved`` as evaluations and
    savers finish."""

    config: RunConfig  # the validated config
    manager: PluginManager  # the plugin registries (e.g. to find another saver)
    resume: bool  # ``llmc run --resume``: output files of the interrupted attempt may exist
    model: Any  # the torch model (``None`` before it loads)
    tokenizer: Any
    adapter: ModelAdapter | None  # blocks and layers of ``model``
    device: Any  # the compute device (``torch.device``)
    method: Method | None  # the compression method's object, when the run has one
    calib_batches: list[Any]  # token-id tensors ``[bs, seq_len]``
    results: list[EvalRecord]  # every evaluation record so far
    quantized: dict[str, QuantizedWeight]  # full layer name -> integer weights
    saved: dict[str, Path]  # saver name -> folder written
    cache: dict[Any, Any]  # shared by evaluators across positions (e.g. tokenized eval text)
    layer_errors: LayerErrors  # per-layer quantization error, for the report
    stages: list[dict[str, Any]]  # ``{stage, seconds, peak_rss_mb[, peak_cuda_mb]}`` per finished stage (each peak the stage's own)
    checkpoint: Any  # the block checkpoint (``llmc_core.checkpoint``), a do-nothing one without
    scheme: Any  # the run's ``llmc_core.quant.scheme.Scheme`` (weights, activations, KV cache), None without quant
    act_scales: dict[str, Any]  # full layer name -> calibrated static input scale (static activation schemes)
    kv_scales: dict[str, dict[str, Any]]  # attention module name -> {"k": scale, "v": scale} (static KV cache)


@dataclass
class ModelState:
    """A :class:`RunState` for a model held outside a run: what a saver reads (``model``,
    ``tokenizer``, ``quantized``, and ``config`` when there is one); everything else is empty."""

    model: Any = None
    tokenizer: Any = None
    quantized: dict[str, Any] = field(default_factory=dict)
    config: Any = None
    manager: Any = None
    resume: bool = False
    adapter: Any = None
    device: Any = None
    method: Any = None
    calib_batches: list[Any] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    saved: dict[str, Path] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)
    layer_errors: Any = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Any = None
    scheme: Any = None
    act_scales: dict[str, Any] = field(default_factory=dict)
    kv_scales: dict[str, dict[str, Any]] = field(default_factory=dict)


# -- role views: what each kind of plugin is handed ---------------------------------------------

SAVER_VIEW = ("config", "manager", "resume", "model", "tokenizer", "quantized", "scheme", "act_scales", "kv_scales")
EVALUATOR_VIEW = ("config", "manager", "model", "tokenizer", "adapter", "device", "cache", "scheme", "quantized")
STEP_VIEW = (*EVALUATOR_VIEW, "saved", "results", "stages", "resume")


class RoleView:
    """A narrow view of a run for one kind of plugin: the attributes of its role (``SAVER_VIEW``,
    ``EVALUATOR_VIEW``, ``STEP_VIEW``), read through to the run, so a saver sees the model, its
    quantized layers and scheme, not the checkpoint or the calibration batches.

    Compatibility with the plugin API before role views: any other :class:`RunState` attribute is
    still served, with a ``DeprecationWarning`` naming the role, so a plugin written against the
    earlier docs keeps running; ``docs/plugins/index.md`` lists what each role holds. Setting an
    attribute is refused: plugins report through their return values.
    """

    __slots__ = ("_state", "_fields", "_role")

    def __init__(self, state: Any, fields: tuple[str, ...], role: str):
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_fields", frozenset(fields))
        object.__setattr__(self, "_role", role)

    def __getattr__(self, name: str) -> Any:
        if name not in self._fields and not name.startswith("__"):
            import warnings

            warnings.warn(f"a {self._role} read run.{name}, which is not part of the {self._role} view ({', '.join(sorted(self._fields))}); it is served for compatibility and may go in a later plugin API", DeprecationWarning, stacklevel=2)
        return getattr(self._state, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a {self._role} cannot set run.{name}: return results instead")
