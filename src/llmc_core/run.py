"""``Run``: one compression job, stage by stage.

Data flows one way: load → pretrain eval → calibrate/transform block by block → transformed eval →
save transformed → quantize → fake_quant eval → save quantized → downstream steps → report.
Lifecycle hooks fire between stages; stages never call each other.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmc_core import __version__
from llmc_core.api import DOWNSTREAM, Method
from llmc_core.checkpoint import Checkpoint, NoCheckpoint
from llmc_core.config import POSITIONS, RunConfig
from llmc_core.errors import LlmcError, first_line
from llmc_core.layer_error import LayerErrors
from llmc_core.memory import peak_rss_mb, release_heap, reset_peak_rss
from llmc_core.plugins import PluginManager, get_manager
from llmc_core.progress import progress
from llmc_core.results import EvalRecord, render_table, write_json
from llmc_core.state import EVALUATOR_VIEW, SAVER_VIEW, STEP_VIEW, RoleView

log = logging.getLogger("llmc")


class Run:
    """Owns the model, tokenizer, calibration batches and results of one config; implements
    :class:`llmc_core.state.RunState`, which is all that plugins, savers, the checkpoint and the
    report see of it."""

    def __init__(self, config: RunConfig, manager: PluginManager | None = None, resume: bool = False):
        self.config = config
        self.resume = resume  # continue from the checkpoint in save_path (``llmc run --resume``)
        self.checkpoint: Checkpoint | NoCheckpoint = NoCheckpoint()  # a real one once execute() opens it
        self.layer_errors = LayerErrors()  # per-layer quantization error, for the report
        self.current_stage: str | None = None
        self.manager = manager or get_manager()
        self.hook = self.manager.hook()
        self.model: Any = None
        self.tokenizer: Any = None
        self.adapter: Any = None
        self.method: Any = None
        self.calib_rows: list[str] | None = None  # read before the model loads
        self.calib_batches: list[Any] = []
        self.results: list[EvalRecord] = []
        self.quantized: dict[str, Any] = {}  # full layer name -> QuantizedWeight
        self.observer: Any = None  # static activation / KV scales seen in the block pass (llmc_core.quant.act.Observer)
        self.act_scales: dict[str, Any] = {}  # full layer name -> static input scale
        self.kv_scales: dict[str, dict[str, Any]] = {}  # attention module name -> {"k": scale, "v": scale}
        self.quantizers: Any = None  # activation / KV quantizers on the model, from fake_quant on
        self.saved: dict[str, Path] = {}  # saver name -> folder
        self.stages: list[dict[str, Any]] = []
        self.device: Any = None
        self.cache: dict[Any, Any] = {}  # e.g. tokenized eval text, shared by positions
        self.output: Any = None  # the held save_path (llmc_core.outlock.OutputFolder) while the run executes
        self.kept_outputs: list[str] = []  # entries of an earlier run left in save_path (save.overwrite: true)
        self.memory_estimate: Any = None  # the preflight's (llmc_core.preflight.Estimate), made before the model loads

    @property
    def scheme(self) -> Any:
        return self.config.scheme

    # -- stages --------------------------------------------------------------------------------

    @contextmanager
    def stage(self, name: str):
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        release_heap()  # what earlier stages freed (an evaluation's logits) is not counted as this stage's
        own = reset_peak_rss()
        start = time.perf_counter()
        log.info("%s ...", name)
        self.current_stage = name
        yield
        self.current_stage = None
        seconds = time.perf_counter() - start
        record = {"stage": name, "seconds": round(seconds, 2), "peak_rss_mb": peak_rss_mb(own)}
        if torch.cuda.is_available():
            record["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.stages.append(record)
        log.info("%s done in %.1f s", name, seconds)

    def execute(self) -> list[EvalRecord]:
        """Run every stage the config asks for; return the evaluation records."""
        error: BaseException | None = None
        self.hook.llmc_run_start(run=self)
        try:
            with contextlib.ExitStack() as held:
                if self.config.save is not None:  # one llmc process at a time in a save_path (src/llmc_core/outlock.py)
                    from llmc_core.outlock import hold

                    self.output = held.enter_context(hold(self.config.save_path))
                self.checkpoint = Checkpoint.open(self.config, self.resume)
                self._execute()
                self.checkpoint.finish()
        except BaseException as exc:
            error = exc
            if not isinstance(exc, KeyboardInterrupt):  # the CLI prints describe_progress() for those
                (log.info if isinstance(exc, LlmcError) else log.error)("run stopped %s", self.describe_progress())
            raise
        finally:
            self.hook.llmc_run_end(run=self, error=error)
        return self.results

    def describe_progress(self) -> str:
        """One line for a stopped run: where it stopped, what finished, what a resume would keep."""
        where = f"during '{self.current_stage}'" if self.current_stage else "between stages"
        done = ", ".join(s["stage"] for s in self.stages) or "nothing"
        ckpt = self.checkpoint
        kept = f"; {ckpt.describe()}, continue with 'llmc run --resume'" if ckpt.blocks_done else ""
        return f"{where}; finished: {done}{kept}; no half-written output folder was left."

    def _execute(self) -> None:
        cfg = self.config
        self._seed(cfg.base.seed)
        if cfg.needs_calibration:  # an empty or unreadable file fails before the model loads
            self.calib_rows = self.read_calibration_rows()
        self.preflight()
        with self.stage("load model"):
            self.load_model()
        if cfg.method is not None:  # fail on a spec the model cannot take before any work
            self.method = cfg.method(cfg.special, cfg.weight)
            self.method.scheme = cfg.scheme
            self.method.check_model(self.adapter)
            self._check_scheme_fits()
            self._check_model_fits()
        self.evaluate("pretrain")
        if cfg.method is not None:
            if cfg.needs_calibration:
                with self.stage("calibration data"):
                    self.load_calibration()
            if type(self.method).transform_model is not Method.transform_model:
                with self.stage(f"{cfg.quant.method_name} whole-model step"):
                    self.method.transform_model(self.adapter, self.device)
            with self.stage(f"{cfg.quant.method_name} transform"):
                self.transform()
            self.evaluate("transformed")
            self.save("transformed")
            if not cfg.quantizes_in_block_pass:
                with self.stage("quantize"):
                    self.quantize()
            if not self.quantized:  # fail closed: never measure or save a float model as quantized
                raise LlmcError(f"quant.method: {cfg.quant.method_name} quantized no layer (its quantize_block returned nothing), so fake_quant was neither measured nor saved. Report this with the config.")
            self.method.finish(overwrite=bool(cfg.save is not None and cfg.save.overwrite) or self.resume)
            self.install_quantizers()  # activations and KV cache quantized from here on
            self.evaluate("fake_quant")
            if "real_quant" in cfg.positions(steps=True):  # the packed int4 layers in place, then the float ones back
                from llmc_core.quant.qlinear import quant_linears

                with quant_linears(self.model, self.quantized, self.config.scheme, self.act_scales):
                    self.evaluate("real_quant")
        self.save("fake_quant")
        self.run_steps(DOWNSTREAM)
        self.report()

    # -- the work ------------------------------------------------------------------------------

    def load_model(self) -> None:
        family = self.config.model_family()
        try:
            self.model, self.tokenizer = family.load(self.config.model)
        except (OSError, ValueError) as exc:  # transformers' words for "this is not a model folder"
            log.debug("loading the model failed", exc_info=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LlmcError(f"model.path: {self.config.model.path} could not be loaded as a {self.config.raw['model']['type']} model ({first}). Give a Hugging Face model folder with config.json, a .gguf file, or pkg:<package>/<file>.") from exc
        self.model.eval()
        self.adapter = family.adapter(self.model)
        self.device = self._pick_device()

    def _pick_device(self) -> Any:
        import torch

        dev = self.config.base.device
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)

    def preflight(self) -> None:
        """Estimate the run's peak host and device memory from the model's config alone, log it,
        and refuse a run that cannot fit before the model loads (:mod:`llmc_core.preflight`). A
        config that cannot be read skips the estimate: loading the model then says what is wrong."""
        from llmc_core import preflight as pf

        try:
            model_config = pf.read_model_config(self.config.model)
            device = self._pick_device()
            est = pf.estimate(self.config, model_config, device.type)
        except Exception as exc:  # noqa: BLE001 - an estimate never stops a run that could load
            log.info("memory estimate skipped (%s)", first_line(exc))
            return
        self.memory_estimate = est
        log.info("memory estimate: %s", est.describe())
        device_free = None
        if device.type == "cuda":
            import torch

            device_free = torch.cuda.mem_get_info(device)[0]
        pf.check(est, pf.available_host(), device_free, pf.resident_bytes())

    def _check_model_fits(self) -> None:
        """Each saver's model check (e.g. packed int4 formats need plain linear layers) and
        ``real_quant``'s, before any work: one line per problem."""
        problems = []
        for saver_cls in self.config.savers:
            try:
                saver_cls().check_model(self.adapter)
            except LlmcError as exc:
                problems += exc.problems
        if "real_quant" in self.config.positions():
            from llmc_core.weights import int4_layer_problem

            problems += [p for p in [int4_layer_problem(self.adapter, "eval.eval_pos: real_quant")] if p]
        if problems:
            raise LlmcError(*problems)

    def load_calibration(self) -> None:
        import torch

        c = self.config.calib
        rows = self.calib_rows if self.calib_rows is not None else self.read_calibration_rows()
        self.calib_rows = None  # a large corpus is not kept for the rest of the run
        samples = self.manager.get("preproc", c.preproc, "calib.preproc")().samples(rows, self.tokenizer, c.n_samples, c.seq_len, c.seed)
        if not samples:
            raise LlmcError(f"calib: the dataset at {c.path} gave no samples of {c.seq_len} tokens. Use more text or a smaller calib.seq_len.")
        bs = len(samples) if c.bs == -1 else c.bs
        self.calib_batches = [torch.cat(samples[i : i + bs], dim=0) for i in range(0, len(samples), bs)]
        log.info("calibration: %d samples x %d tokens in %d batch(es)", len(samples), c.seq_len, len(self.calib_batches))

    def read_calibration_rows(self) -> list[str]:
        c = self.config.calib
        return self.manager.get("dataset", c.name, "calib.name")().read_rows(c.path, c.download, "calib", "calib.path")

    def transform(self) -> None:
        from llmc_core.blockwise import capture_block_inputs, run_blocks, sub_batches

        method, quant_out = self.method, self.config.quant.quant_out
        if not self.config.needs_calibration:
            return
        calibrates = type(method).needs_calibration
        if self.config.scheme.needs_calibration:
            from llmc_core.quant.act import Observer

            self.observer = Observer(self.config.scheme)
        ckpt = self.checkpoint
        start = ckpt.restore_blocks(self)
        if start == len(self.adapter.blocks()):
            return
        inputs, kwargs = capture_block_inputs(self.model, self.adapter, self.calib_batches, self.device)
        if start:
            inputs = ckpt.load_outputs(self.device)
            log.info("resuming at block %d: blocks 0-%d restored from %s", start, start - 1, ckpt.folder)

        def work(ctx: Any) -> None:
            if calibrates:
                method.transform_block(ctx)
            if self.observer is not None:  # static scales of the transformed block's activations
                with self.observer.watching(ctx.block, ctx.prefix, ctx.adapter.quant_linears(ctx.block)):
                    outputs = ctx.forward()
                ctx.outputs = ctx.outputs or outputs
            if quant_out:
                ctx.outputs = []  # transform_block's outputs are the float block's; quantize_block may set the quantized one's
                with self.layer_errors.quantizing(ctx, inputs_follow=True):
                    self.quantized.update(method.quantize_block(ctx))
            self.layer_errors.listen(ctx)  # samples a few layer inputs during the runner's output pass
            if ctx.outputs:  # the method computed them: no output pass, so sample on one sample's forward
                h, kw, _ = sub_batches(ctx.inputs, ctx.kwargs, 1)
                ctx.forward(h, kw)

        def after(ctx: Any) -> None:
            self.layer_errors.stop(ctx)
            ckpt.save_block(self, ctx)  # before the hook: a block is finished once it is kept
            self.hook.llmc_block_done(run=self, index=ctx.index, block=ctx.block)

        run_blocks(self.adapter, inputs, kwargs, self.device, work, lambda it: progress(it, desc="blocks"), after, start=start, quant_out=quant_out)

    def install_quantizers(self) -> None:
        """Put the scheme's activation and KV quantizers on the model (static scales from the block
        pass); they stay for every later position (fake_quant, real_quant, lm_eval)."""
        scheme = self.config.scheme
        if scheme is None or scheme.weight_only:
            return
        from llmc_core.quant.act import install

        if self.observer is not None:
            self.act_scales, self.kv_scales = self.observer.act_scales(), self.observer.kv_scales()
        try:
            self.quantizers = install(self.model, scheme, sorted(self.quantized), self.act_scales, self.kv_scales)
        except ValueError as exc:  # fail closed: a layer without its calibrated scale
            raise LlmcError(f"quant.act: {exc}. Report this with the config.") from exc
        log.info("activation quantizers on %d layers and KV cache quantizers where the scheme has them (%s)", len(self.quantized), scheme.describe())

    def _check_scheme_fits(self) -> None:
        """Refuse what the quantizers cannot reach, before any work: activations of layers that are
        not modules (fused 3-D MoE experts), a KV cache without separate k_proj / v_proj (fused
        QKV), an activation group size that does not divide a layer's input."""
        import torch

        scheme = self.config.scheme
        if scheme is None or scheme.weight_only:
            return
        linears = self.adapter.named_quant_linears()
        problems = []
        if scheme.act is not None:
            fused = [n for n, lin in linears.items() if not isinstance(lin, torch.nn.Linear)]  # as weights.int4_layer_problem tells them
            if fused:
                problems.append(f"quant.act: {fused[0]} (and {len(fused) - 1} more) are fused MoE experts (3-D weights, no module per expert), whose inputs llmc cannot quantize yet; quantize weights only (remove quant.act) for this model.")
            g = scheme.act.group_size if scheme.act.granularity == "per_group" else None
            bad = [n for n, lin in linears.items() if g and getattr(lin, "in_features", g) % g]
            if bad:
                problems.append(f"quant.act.group_size: {g} does not divide the input size of {bad[0]} (and {len(bad) - 1} more); choose a group size that divides every layer's input.")
        if scheme.kv is not None:
            from llmc_core.quant.act import attention_modules

            if not attention_modules(self.model):
                problems.append("quant.kvcache: this model has no attention module with separate k_proj and v_proj layers (fused QKV), so llmc cannot quantize its KV cache; remove quant.kvcache.")
        if problems:
            raise LlmcError(*problems)

    def quantize(self) -> None:
        """The quantize pass: the same block loop, with no inputs (nothing is computed but the weights)."""
        from llmc_core.blockwise import run_blocks

        def work(ctx: Any) -> None:
            with self.layer_errors.quantizing(ctx):
                self.quantized.update(self.method.quantize_block(ctx))

        run_blocks(self.adapter, [], [], self.device, work, lambda it: progress(it, desc="quantize"), step="quantize")

    def evaluate(self, position: str) -> None:
        restored = self.checkpoint.records(position)
        if restored is not None:  # measured before the interruption, on the same weights
            log.info("eval %s: restored from the checkpoint", position)
            self._record(restored)
            return
        first = len(self.results)
        # a method without calibration data: layer inputs for the error report come from this pass
        listen = position == "pretrain" and self.method is not None and not type(self.method).needs_calibration
        if listen:
            self.layer_errors.listen_model(self.adapter)
        try:
            for evaluator, options in self.config.evals:
                if position in options.eval_pos:
                    with self.stage(f"eval {position} ({evaluator.name} {getattr(options, 'name', '')})"):
                        self._record(evaluator().evaluate(RoleView(self, EVALUATOR_VIEW, "evaluator"), options, position))
        finally:
            if listen:
                self.layer_errors.stop()
        self.run_steps(position)  # steps that measure in place (lm_eval)
        self.checkpoint.add_records(position, self.results[first:])

    def run_steps(self, position: str) -> None:
        """The steps (top-level sections such as ``lm_eval``, ``opencompass``) whose
        ``positions(options)`` name ``position``: a model position, or ``downstream`` after the savers."""
        for step, options in self.config.steps.values():
            if position in step.positions(options):
                with self.stage(f"eval {position} ({step.name})" if position in POSITIONS else step.name):
                    self._record(step().evaluate(RoleView(self, STEP_VIEW, "step"), options, position))

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
            if self.checkpoint.is_saved(saver_cls.name, target):
                self.saved[saver_cls.name] = target
                log.info("%s model was saved to %s before the interruption", saver_cls.name, target)
                continue
            overwrite = self.config.save.overwrite or self.resume  # a resumed run may redo a save cut short
            with self.stage(f"save {saver_cls.name}"), atomic_folder(target, overwrite=overwrite) as tmp:
                saver_cls().save(RoleView(self, SAVER_VIEW, "saver"), str(tmp))
            self.saved[saver_cls.name] = target
            self.checkpoint.mark_saved(saver_cls.name)
            log.info("saved %s model to %s", saver_cls.name, target)

    def report(self) -> None:
        if self.results:
            print(render_table(self.results))
        if self.config.save is not None:
            out = self.config.save_path
            out.mkdir(parents=True, exist_ok=True)
            layers = self.layer_errors.finish()
            if self.output is not None and not self.resume:  # save.overwrite: true replaced only what this run writes
                self.kept_outputs = [n for n in self.output.kept() if n not in ("results.json", "report.md", "report.png")]
                if self.kept_outputs:
                    log.warning("%s still holds %s from an earlier run (this run did not write them); see report.md", out, ", ".join(self.kept_outputs))
            extra = {"config": self.config.source, "llmc_version": __version__, "stages": self.stages, "layer_errors": layers, "kept_from_earlier_run": self.kept_outputs}
            if hasattr(self.method, "timings"):  # a recipe: each method's seconds in the block pass
                extra["recipe"] = self.method.timings()
            if self.memory_estimate is not None:
                extra["memory"] = self.memory_summary()
            write_json(out / "results.json", self.results, extra)
            from llmc_core.report import write_report

            write_report(self, out)

    def memory_summary(self) -> dict[str, Any] | None:
        """The preflight's estimate beside the measured peaks (the largest stage peaks), in MB;
        None without an estimate."""
        if self.memory_estimate is None:
            return None
        out = {"estimate": self.memory_estimate.as_dict(), "measured_peak_rss_mb": max((s["peak_rss_mb"] for s in self.stages), default=None)}
        cuda = [s["peak_cuda_mb"] for s in self.stages if "peak_cuda_mb" in s]
        if cuda:
            out["measured_peak_cuda_mb"] = max(cuda)
        return out

    @staticmethod
    def _seed(seed: int) -> None:
        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

