"""The narrow run state plugins see, the do-nothing checkpoint, and a third-party step section."""

from __future__ import annotations

import inspect
import types
from typing import get_type_hints

import pytest

from llmc_core import config, hookimpl
from llmc_core.api import DOWNSTREAM, StrictModel, Step
from llmc_core.checkpoint import Checkpoint, NoCheckpoint
from llmc_core.errors import LlmcError
from llmc_core.results import EvalRecord
from llmc_core.run import Run
from llmc_core.state import ModelState, RunState
from llmc_core.testing import registered, run_config

FIELDS = sorted(RunState.__annotations__)


def test_run_and_model_state_have_every_run_state_field(tiny_model_dir, tiny_text_file, tmp_path):
    run = Run(config.validate(run_config(tiny_model_dir, tiny_text_file, tmp_path / "o")))
    assert len(FIELDS) >= 15 and {"config", "model", "adapter", "quantized", "saved", "results"} <= set(FIELDS)
    assert [f for f in FIELDS if not hasattr(run, f)] == []
    assert [f for f in FIELDS if not hasattr(ModelState(), f)] == []
    from llmc_core import adapters, api, layer_error, plugins, quant

    names = {"ModelAdapter": adapters.ModelAdapter, "Method": api.Method, "RunConfig": config.RunConfig, "LayerErrors": layer_error.LayerErrors,
             "PluginManager": plugins.PluginManager, "QuantizedWeight": quant.QuantizedWeight, "EvalRecord": EvalRecord}
    assert set(get_type_hints(RunState, localns=names)) == set(FIELDS)  # the TYPE_CHECKING names exist where state.py says


def test_no_checkpoint_has_the_checkpoint_interface():
    public = {n for n, _ in inspect.getmembers(Checkpoint) if not n.startswith("_")} - {"open"}
    missing = sorted(n for n in public | {"folder", "restored_blocks"} if not hasattr(NoCheckpoint, n))
    assert missing == []
    none = NoCheckpoint()
    assert none.records("pretrain") is None and none.restore_blocks(None) == 0 and none.blocks_done == 0
    assert none.is_saved("fake", None) is False


def test_checkpoint_open_without_checkpointing_is_a_no_checkpoint(tiny_model_dir, tiny_text_file, tmp_path):
    cfg = config.validate(run_config(tiny_model_dir, tiny_text_file, tmp_path / "o"))
    assert isinstance(Checkpoint.open(cfg, resume=False), NoCheckpoint)
    assert not (tmp_path / "o").exists()


class EchoConfig(StrictModel):
    at: list[str] = [DOWNSTREAM]
    bad: bool = False


class Echo(Step):
    """A test step: one record per position it is asked for, with what it saw of the state."""

    name = "echo_step"
    section = "echo"
    Config = EchoConfig

    def check(self, run_config, options):
        if options.bad:
            raise LlmcError("echo.bad: refused by the step's check.")

    @staticmethod
    def positions(options):
        return list(options.at)

    def evaluate(self, state, options, position):
        seen = float(len(state.saved)) if position == DOWNSTREAM else float(len(state.results))
        return [EvalRecord(position, "echo_step", "none", "seen", seen, 0.0)]


plugin = types.SimpleNamespace(llmc_register_steps=hookimpl(lambda register: register(Echo)))


def test_a_third_party_step_owns_its_section_and_runs_where_it_says(tiny_model_dir, tiny_text_file, tmp_path, fresh_plugins):
    base = run_config(tiny_model_dir, tiny_text_file, tmp_path / "o", save={"save_path": str(tmp_path / "o"), "save_fake": True})
    with pytest.raises(LlmcError, match="echo: unknown section"):
        config.validate({**base, "echo": {}})
    with registered(plugin, distribution="llmc-echo"):
        with pytest.raises(LlmcError, match="refused by the step's check"):
            config.validate({**base, "echo": {"bad": True}})
        with pytest.raises(LlmcError, match="echo.nope: unknown key"):
            config.validate({**base, "echo": {"nope": 1}})
        cfg = config.validate({**base, "echo": {"at": ["pretrain", DOWNSTREAM]}})
        run = Run(cfg)
        records = [r for r in run.execute() if r.evaluator == "echo_step"]
    assert [(r.position, r.value) for r in records] == [("pretrain", 1.0), (DOWNSTREAM, 1.0)]  # after pretrain's ppl; after the fake saver
    stages = [s["stage"] for s in run.stages]
    assert "eval pretrain (echo_step)" in stages and stages[-1] == "echo_step"


def test_a_step_may_not_take_a_core_section(tiny_model_dir, tiny_text_file, tmp_path, fresh_plugins):
    class Thief(Echo):
        name = "thief"
        section = "quant"

    thief = types.SimpleNamespace(llmc_register_steps=hookimpl(lambda register: register(Thief)))
    with registered(thief, distribution="llmc-thief"), pytest.raises(LlmcError, match="claims the section 'quant', which llmc itself owns"):
        config.validate(run_config(tiny_model_dir, tiny_text_file, tmp_path / "o"))
