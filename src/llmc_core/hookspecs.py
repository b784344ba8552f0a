"""Every extension point of llmc.

A plugin is a module (or object) with functions marked ``@llmc_core.hookimpl`` whose names match the
specs below. Built-in plugins in ``llmc_plugins`` use exactly these hooks; third-party packages
register through the ``llmc`` entry-point group.

Registration hooks receive a ``register`` callback and call it once per class they provide; each
class carries a ``name`` (what the YAML config selects, case-insensitive) and a pydantic ``Config``.
The core keeps one registry per kind, rejects duplicate names and records which distribution gave
which name. Lifecycle hooks let a plugin observe a run; their return values are ignored. They receive the
run's :class:`~llmc_core.state.RunState` as ``run`` (the argument keeps that name: pluggy matches
implementations by argument name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llmc_core import hookspec

if TYPE_CHECKING:
    import torch

    from llmc_core.api import Dataset, Evaluator, Method, ModelFamily, Preproc, Saver, Step
    from llmc_core.results import EvalRecord
    from llmc_core.state import RunState


# ---------------------------------------------------------------------------------------------
# load: model families
# ---------------------------------------------------------------------------------------------


@hookspec
def llmc_register_models(register: Callable[[type[ModelFamily]], None]) -> None:
    """Register model families (subclasses of :class:`llmc_core.api.ModelFamily`).

    Called by the plugin manager the first time a registry is needed. ``model.type`` in the
    config selects a family by its ``name`` or one of its ``aliases``.

    :param register: call ``register(FamilyClass)`` once per family.
    """


# ---------------------------------------------------------------------------------------------
# calibrate: datasets and preprocessors
# ---------------------------------------------------------------------------------------------


@hookspec
def llmc_register_datasets(register: Callable[[type[Dataset]], None]) -> None:
    """Register datasets (subclasses of :class:`llmc_core.api.Dataset`).

    ``calib.name`` and ``eval.name`` select a dataset by its ``name``.

    :param register: call ``register(DatasetClass)`` once per dataset.
    """


@hookspec
def llmc_register_preprocs(register: Callable[[type[Preproc]], None]) -> None:
    """Register calibration preprocessors (subclasses of :class:`llmc_core.api.Preproc`).

    ``calib.preproc`` selects one by its ``name``; it turns dataset rows into token samples.

    :param register: call ``register(PreprocClass)`` once per preprocessor.
    """


# ---------------------------------------------------------------------------------------------
# quantize: compression methods
# ---------------------------------------------------------------------------------------------


@hookspec
def llmc_register_methods(register: Callable[[type[Method]], None]) -> None:
    """Register compression methods (subclasses of :class:`llmc_core.api.Method`).

    ``quant.method`` selects one by its ``name``; ``quant.special`` is validated against the
    method's ``Config``.

    :param register: call ``register(MethodClass)`` once per method.
    """


@hookspec
def llmc_block_done(run: RunState, index: int, block: torch.nn.Module) -> None:
    """Called by the block-wise runner after the method has processed decoder block ``index``.

    :param run: the current run.
    :param index: the block's position in the model (0-based).
    :param block: the block itself, still on the compute device.
    """


# ---------------------------------------------------------------------------------------------
# evaluate: evaluators
# ---------------------------------------------------------------------------------------------


@hookspec
def llmc_register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    """Register evaluators (subclasses of :class:`llmc_core.api.Evaluator`).

    ``eval.type`` (default ``ppl``) selects one by its ``name``; the ``eval`` section is validated
    against the evaluator's ``Config``.

    :param register: call ``register(EvaluatorClass)`` once per evaluator.
    """


@hookspec
def llmc_register_steps(register: Callable[[type[Step]], None]) -> None:
    """Register downstream steps (subclasses of :class:`llmc_core.api.Step`).

    Each step owns the top-level config section ``Step.section_name()`` (e.g. ``opencompass``,
    ``lm_eval``): when the config has it, it is validated against the step's ``Config``, the
    step's ``check`` runs at validation, and the run calls ``evaluate`` at each position its
    ``positions(options)`` returns (``downstream``: once after the savers).

    :param register: call ``register(StepClass)`` once per step.
    """


@hookspec
def llmc_evaluation_done(run: RunState, record: EvalRecord) -> None:
    """Called after each evaluation result is recorded.

    :param run: the current run.
    :param record: the result (position, evaluator, dataset, metric, value, seconds).
    """


# ---------------------------------------------------------------------------------------------
# save: savers
# ---------------------------------------------------------------------------------------------


@hookspec
def llmc_register_savers(register: Callable[[type[Saver]], None]) -> None:
    """Register savers (subclasses of :class:`llmc_core.api.Saver`).

    A saver named ``x`` is switched on by ``save.save_x: true`` and writes the folder
    ``save.save_path/<Saver.folder>`` atomically.

    :param register: call ``register(SaverClass)`` once per saver.
    """


# ---------------------------------------------------------------------------------------------
# report: run lifecycle
# ---------------------------------------------------------------------------------------------


@hookspec
def llmc_run_start(run: RunState) -> None:
    """Called once the config is validated and before the model loads.

    :param run: the run about to start; ``run.config`` is the validated config.
    """


@hookspec
def llmc_run_end(run: RunState, error: BaseException | None) -> None:
    """Called when the run ends, successfully or not.

    :param run: the run; ``run.results`` holds every evaluation record.
    :param error: the exception that ended the run, or ``None`` on success.
    """


def all_hook_names() -> list[str]:
    """The names of every hook spec, in file order (used by docs and tests)."""
    import inspect
    import sys

    module = sys.modules[__name__]
    hooks = [f for n, f in inspect.getmembers(module, inspect.isfunction) if n.startswith("llmc_")]
    return [f.__name__ for f in sorted(hooks, key=lambda f: f.__code__.co_firstlineno)]


