"""Recipes: several methods in one run (``quant.method: [SmoothQuant, GPTQ]``).

A recipe is itself a :class:`~llmc_core.api.Method`, so the runner, the checkpoint and the report
treat one method and many alike. On each block every method's ``transform_block`` runs in the
recipe's order, each on the block as the one before left it (SmoothQuant's folded scales are what
GPTQ's Hessians see); then the **last** method's ``quantize_block`` rounds the weights. The methods
before it are transforms: their own quantizer is never called.

Options: each method's ``quant.special`` goes under its name (matched as ``quant.method`` matches
names, case-insensitively, aliases included)::

    quant:
      method: [SmoothQuant, GPTQ]
      scheme: W8A8
      special:
        SmoothQuant: {alpha: 0.8}
        GPTQ: {actorder: true}

A one-method list (``[GPTQ]``) is that method with its options as usual. The core names no method:
what a method cannot do as a transform it says itself (:meth:`Method.transform_problems`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, ClassVar

from pydantic import BaseModel

from llmc_core.api import Method
from llmc_core.errors import LlmcError


class RecipeOptions(BaseModel):
    """``quant.special`` of a recipe: each method's validated options, by its position in the recipe."""

    model_config = {"arbitrary_types_allowed": True, "frozen": True}
    steps: tuple[Any, ...]


class Recipe(Method):
    """Methods run in order on each block: every one's transform, then the last one's quantizer."""

    methods: ClassVar[tuple[type[Method], ...]] = ()

    def __init__(self, options: RecipeOptions, weight: Any):
        super().__init__(options, weight)
        self.steps = [cls(opts, weight) for cls, opts in zip(self.methods, options.steps)]
        self.seconds = [0.0] * len(self.steps)  # per method: seconds in its block calls

    # The run's scheme reaches every method of the recipe.
    @property
    def scheme(self) -> Any:
        return self.steps[-1].scheme

    @scheme.setter
    def scheme(self, value: Any) -> None:
        for step in self.steps:
            step.scheme = value

    @classmethod
    def accepts(cls, scheme: Any) -> list[str]:
        return [f"{m.name} in the recipe: {p}" for m in cls.methods for p in m.accepts(scheme)]

    @classmethod
    def memory(cls, shapes: Any, options: RecipeOptions, samples: int, seq_len: int) -> list[Any]:
        """The largest of the methods' own: they work on the block one after another."""
        each = [m.memory(shapes, opts, samples, seq_len) for m, opts in zip(cls.methods, options.steps)]
        return max(each, key=lambda parts: sum(p.bytes for p in parts), default=[])

    @classmethod
    def check(cls, run_config: Any) -> None:
        problems = []
        for i, m in enumerate(cls.methods):
            opts = run_config.special.steps[i]
            if i < len(cls.methods) - 1:
                problems += [f"quant.special.{m.name}: {p}" for p in m.transform_problems(opts)]
            try:
                m.check(replace(run_config, special=opts))  # the run's config with this method's options as its own
            except LlmcError as exc:
                problems += exc.problems
        if problems:
            raise LlmcError(*problems)

    def check_model(self, adapter: Any) -> None:
        for step in self.steps:
            step.check_model(adapter)

    def transform_model(self, adapter: Any, device: Any) -> None:
        for step in self.steps:
            step.transform_model(adapter, device)

    def transform_block(self, ctx: Any) -> None:
        for i, step in enumerate(self.steps):
            if not type(step).needs_calibration:
                continue
            if i:  # outputs a method before computed are not those of the block as this one leaves it
                ctx.outputs = []
            start = time.perf_counter()
            step.transform_block(ctx)
            self.seconds[i] += time.perf_counter() - start

    def quantize_block(self, ctx: Any) -> dict[str, Any]:
        start = time.perf_counter()
        out = self.steps[-1].quantize_block(ctx)
        self.seconds[-1] += time.perf_counter() - start
        return out

    def finish(self, overwrite: bool) -> None:
        for step in self.steps:
            step.finish(overwrite)

    def timings(self) -> list[dict[str, Any]]:
        """Each method of the recipe and the seconds of its block calls (for the report)."""
        return [{"method": type(s).name, "seconds": round(self.seconds[i], 2)} for i, s in enumerate(self.steps)]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": [{"name": type(s).name, "state": s.state_dict(), "log": s.log, "seconds": self.seconds[i]} for i, s in enumerate(self.steps)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = state.get("steps", [])
        if [k["name"] for k in kept] != [type(s).name for s in self.steps]:
            raise LlmcError(f"--resume: the checkpoint was written by the recipe [{', '.join(k['name'] for k in kept)}], this run is [{', '.join(type(s).name for s in self.steps)}]. Start over without --resume and with save.overwrite: true.")
        for i, (step, k) in enumerate(zip(self.steps, kept)):
            step.load_state_dict(k["state"])
            step.log = list(k["log"])
            self.seconds[i] = float(k["seconds"])


def recipe_class(methods: list[type[Method]]) -> type[Method]:
    """The :class:`Recipe` of ``methods`` in that order (a class, as ``quant.method`` resolves to)."""
    attrs = {"methods": tuple(methods), "name": "+".join(m.name for m in methods), "needs_calibration": any(m.needs_calibration for m in methods), "Config": RecipeOptions, "__doc__": Recipe.__doc__}
    if all(m.transform_model is Method.transform_model for m in methods):
        attrs["transform_model"] = Method.transform_model  # no whole-model step: the run skips that stage
    return type("Recipe", (Recipe,), attrs)
