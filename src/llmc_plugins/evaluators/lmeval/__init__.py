"""The ``lm_eval`` section: downstream accuracy with EleutherAI's lm-evaluation-harness, in process.

At each position in ``eval_mode`` the run hands its in-memory model and tokenizer to lm-eval's
``HFLM`` (``pretrained=<model object>``) and runs ``simple_evaluate`` right after that position's
perplexity, so what is measured is exactly the model whose PPL llmc just reported, and nothing is
saved for it. Each task's metrics become records ``(position, lm_eval, task, metric, value,
stderr)`` in ``results.json``, the table and ``report.md``. How this differs from the
``opencompass`` step (a subprocess on a saved folder) is in ``docs/lm_eval.md``.

```yaml
lm_eval:
  tasks: [llmc_wikitext2_cloze]      # lm-eval task, group or tag names (or task YAML paths)
  include_path: configs/lm_eval      # folder(s) of local task YAMLs
  eval_mode: [pretrain, fake_quant]  # any of pretrain, transformed, fake_quant, real_quant
  num_fewshot: 0
  batch_size: 8
  limit: 100                         # first 100 documents per task (quick runs)
```

Fields (named as lm-eval names them; each is passed to ``simple_evaluate`` / ``HFLM`` as is):
- ``tasks``: a list, or one comma-separated string as on lm-eval's command line.
- ``include_path``: a folder (or list of folders) of task YAMLs, indexed before lm-eval's own.
- ``eval_mode``: the positions to evaluate at (default ``[pretrain, fake_quant]``).
- ``num_fewshot``, ``limit`` (a count, or a fraction below 1), ``batch_size`` (an int, ``auto``
  or ``auto:N``), ``apply_chat_template`` (true or a template name), ``gen_kwargs`` (a mapping or
  ``"temperature=0,max_gen_toks=64"``; generation tasks only), ``bootstrap_iters`` (for the
  stderr of non-mean metrics; 0 turns those off).
- ``output_path``: where lm-eval's full results go, one ``<position>/results.json`` each
  (default ``<save_path>/lm_eval``; nothing is written without either).
- ``log_samples``: also write lm-eval's per-document samples beside them.

Validation (before the model loads) checks that lm-eval is installed (else the pip command),
that ``include_path`` exists, that every task name is known to lm-eval (with a suggestion), and
that quantized positions have a quant section. When the run starts, still before the model
loads, the tasks are built once (reading their data), so missing data stops it early too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from llmc_core import hookimpl
from llmc_core.api import Step, StrictModel
from llmc_core.errors import LlmcError
from llmc_core.schema import unique

Position = Literal["pretrain", "transformed", "fake_quant", "real_quant"]


class LmEvalConfig(StrictModel):
    """The top-level ``lm_eval`` section (fields documented in the module docstring)."""

    tasks: list[str] = Field(min_length=1)
    include_path: list[str] | None = None
    eval_mode: list[Position] = Field(default_factory=lambda: ["pretrain", "fake_quant"], min_length=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int | str = 1
    limit: float | None = Field(default=None, gt=0)
    apply_chat_template: bool | str = False
    gen_kwargs: dict[str, Any] | str | None = None
    bootstrap_iters: int = Field(default=100000, ge=0)
    output_path: str | None = None
    log_samples: bool = False

    @field_validator("tasks", "include_path", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # lm-eval's CLI form: "hellaswag,arc_easy"
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("eval_mode")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return unique(value)

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | str) -> int | str:
        import re

        if isinstance(value, int) and value < 1 or isinstance(value, str) and not re.fullmatch(r"auto(:\d+)?", value):
            raise ValueError("give a positive number of documents, auto, or auto:N")
        return value

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: float | None) -> float | int | None:
        if value is not None and value >= 1:
            if value != int(value):
                raise ValueError("give a count of documents (an integer) or a fraction below 1")
            return int(value)
        return value


class LmEval(Step):
    """Downstream accuracy through lm-evaluation-harness, in process, on the in-memory model."""

    path_keys = ("output_path",)
    name = "lm_eval"  # and the section it owns
    Config = LmEvalConfig

    @staticmethod
    def positions(options: LmEvalConfig) -> list[str]:
        """The run positions this step evaluates at (right after the ``eval`` sections there)."""
        return list(options.eval_mode)

    def check(self, run_config: Any, options: LmEvalConfig) -> None:
        """Raise every problem of the section, before any model loads (no torch import)."""
        from llmc_plugins.evaluators.lmeval import checks

        lines = checks.rule_problems(run_config, options)
        lines += checks.include_path_problems(options.include_path)
        install = checks.install_problems()
        lines += install
        if not install and not lines:  # task names need lm-eval and readable include paths
            lines += checks.task_problems(options.tasks, options.include_path)
        if lines:
            raise LlmcError(*lines)

    def evaluate(self, state: Any, config: LmEvalConfig, position: str):
        """Run lm-eval's tasks on ``state.model`` as it is at ``position``."""
        from llmc_plugins.evaluators.lmeval.runner import evaluate_at

        return evaluate_at(state, config, position)


@hookimpl
def llmc_register_steps(register):
    register(LmEval)


@hookimpl
def llmc_run_start(run):
    """Build the tasks once before the model loads: a task whose data cannot be read (a hub task
    offline with a cold cache, a local file gone) stops the run before any work, not after it."""
    entry = run.config.steps.get(LmEval.section_name())
    if entry is not None and entry[0] is LmEval:
        from llmc_plugins.evaluators.lmeval.runner import load_tasks, resolve_tasks

        load_tasks(*resolve_tasks(entry[1]))
