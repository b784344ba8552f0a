"""``Run``: one compression job, stage by stage.

Data flows one way: load → pretrain eval → calibrate/transform block by block → transformed eval →
save transformed → quantize → fake_quant eval → save quantized → downstream steps → report.
Lifecycle hooks fire between stages; stages never call each other.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmc_core import __version__
from llmc_core.config import RunConfig
from llmc_core.errors import LlmcError
from llmc_core.plugins import PluginManager, get_manager
from llmc_core.results import EvalRecord, render_table, write_json

log = logging.getLogger("llmc")


def progress(iterable: Any, **kwargs: Any) -> Any:
    """A tqdm bar when attached to a terminal, the plain iterable otherwise."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not sys.stderr.isatty(), leave=False, **kwargs)


class Run:
    """Owns the model, tokenizer, calibration batches and results of one config."""

    def __init__(self, config: RunConfig, manager: PluginManager | None = None):
        self.config = config
        self.manager = manager or get_manager()
        self.hook = self.manager.hook()
        self.model: Any = None
        self.tokenizer: Any = None
        self.adapter: Any = None
        self.method: Any = None
        self.calib_batches: list[Any] = []
        self.results: list[EvalRecord] = []
        self.quantized: dict[str, Any] = {}  # full layer name -> QuantizedWeight
        self.saved: dict[str, Path] = {}  # saver name -> folder
        self.stages: list[dict[str, Any]] = []
        self.device: Any = None
        self.cache: dict[Any, Any] = {}  # e.g. tokenized eval text, shared by positions

    # -- stages --------------------------------------------------------------------------------

    @contextmanager
    def stage(self, name: str):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        log.info("%s ...", name)
        yield
        seconds = time.perf_counter() - start
        record = {"stage": name, "seconds": round(seconds, 2), "peak_rss_mb": _peak_rss_mb()}
        if torch.cuda.is_available():
            record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.stages.append(record)
        log.info("%s done in %.1f s", name, seconds)

    def execute(self) -> list[EvalRecord]:
        """Run every stage the config asks for; return the evaluation records."""
        error: BaseException | None = None
        self.hook.llmc_run_start(run=self)
        try:
            self._execute()
        except BaseException as exc:
            error = exc
            done = ", ".join(s["stage"] for s in self.stages) or "nothing"
            log.error("run stopped during stage %d; finished: %s", len(self.stages) + 1, done)
            raise
        finally:
            self.hook.llmc_run_end(run=self, error=error)
        return self.results

    def _execute(self) -> None:
        cfg = self.config
        self._seed(cfg.base.seed)
        with self.stage("load model"):
            self.load_model()
        self.evaluate("pretrain")
        if cfg.method is not None:
            self.method = cfg.method(cfg.special, cfg.weight)
            self.method.check_model(self.adapter)
            if cfg.method.needs_calibration:
                with self.stage("calibration data"):
                    self.load_calibration()
            with self.stage(f"{cfg.quant.method} transform"):
                self.transform()
            self.evaluate("transformed")
            self.save("transformed")
            if not cfg.quant.quant_out:
                with self.stage("quantize"):
                    self.quantize()
            self.evaluate("fake_quant")
        self.save("fake_quant")
        for step, options in cfg.extras.values():
            with self.stage(step.name):
                self._record(step().evaluate(self, options, "downstream"))
        self.report()

    # -- the work ------------------------------------------------------------------------------

    def load_model(self) -> None:
        import torch

        family = self.config.model_family()
        self.model, self.tokenizer = family.load(self.config.model)
        self.model.eval()
        self.adapter = family.adapter(self.model)
        dev = self.config.base.device
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)

    def load_calibration(self) -> None:
        import torch

        c = self.config.calib
        rows = self.manager.get("dataset", c.name, "calib.name")().load_rows(c.path, c.download, "calib")
        samples = self.manager.get("preproc", c.preproc, "calib.preproc")().samples(rows, self.tokenizer, c.n_samples, c.seq_len, c.seed)
        if not samples:
            raise LlmcError(f"calib: the dataset at {c.path} gave no samples of {c.seq_len} tokens. Use more text or a smaller calib.seq_len.")
        bs = len(samples) if c.bs == -1 else c.bs
        self.calib_batches = [torch.cat(samples[i : i + bs], dim=0) for i in range(0, len(samples), bs)]
        log.info("calibration: %d samples x %d tokens in %d batch(es)", len(samples), c.seq_len, len(self.calib_batches))

    def transform(self) -> None:
        from llmc_core.blockwise import capture_block_inputs, run_blocks

        method, quant_out = self.method, self.config.quant.quant_out
        if not type(method).needs_calibration:
            return
        inputs, kwargs = capture_block_inputs(self.model, self.adapter, self.calib_batches, self.device)

        def work(ctx: Any) -> None:
            method.transform_block(ctx)
            if quant_out:
                self.quantized.update(method.quantize_block(ctx))

        def after(ctx: Any) -> None:
            self.hook.llmc_block_done(run=self, index=ctx.index, block=ctx.block)

        run_blocks(self.adapter, inputs, kwargs, self.device, work, lambda it: progress(it, desc="blocks"), after)

    def quantize(self) -> None:
        from llmc_core.blockwise import BlockContext, _device_of

        for i, block in enumerate(progress(self.adapter.blocks(), desc="quantize")):
            home = _device_of(block)
            block.to(self.device)
            ctx = BlockContext(i, block, self.adapter.block_prefix(i), self.adapter, [], [], self.device)
            self.quantized.update(self.method.quantize_block(ctx))
            block.to(home)

    def evaluate(self, position: str) -> None:
        for evaluator, options in self.config.evals:
            if position in options.eval_pos:
                with self.stage(f"eval {position} ({evaluator.name} {getattr(options, 'name', '')})"):
                    self._record(evaluator().evaluate(self, options, position))

    def _record(self, records: list[EvalRecord]) -> None:
        for r in records:
            self.results.append(r)
            log.info("%s %s %s %s = %.4f", r.position, r.evaluator, r.dataset, r.metric, r.value)
            self.hook.llmc_evaluation_done(run=self, record=r)

    def save(self, position: str) -> None:
        from llmc_core.fsutil import atomic_folder

        for saver_cls in self.config.savers:
            if saver_cls.position != position:
                continue
            target = self.config.save_path / saver_cls.folder
            with self.stage(f"save {saver_cls.name}"), atomic_folder(target, overwrite=self.config.save.overwrite) as tmp:
                saver_cls().save(self, str(tmp))
            self.saved[saver_cls.name] = target
            log.info("saved %s model to %s", saver_cls.name, target)

    def report(self) -> None:
        if self.results:
            print(render_table(self.results))
        if self.config.save is not None:
            out = self.config.save_path
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "results.json", self.results, {"config": self.config.source, "llmc_version": __version__, "stages": self.stages})

    @staticmethod
    def _seed(seed: int) -> None:
        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
