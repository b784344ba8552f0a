"""The ``Gptq`` method: Hessian-based rounding with error feedback, one decoder block at a time."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from llmc_core.api import Method, StrictModel
from llmc_core.errors import LlmcError
from llmc_core.schema import reject_unsupported

log = logging.getLogger("llmc.gptq")

# ModelTC/llmc GPTQ keys llmc does not implement: rejected with the reason, never silently ignored.
UNSUPPORTED = {
    "owq": "OWQ (outlier columns kept in float) is not implemented; remove owq and n_outs",
    "n_outs": "it belongs to OWQ, which is not implemented; remove owq and n_outs",
    "quant_out": "it is a quant-level key in llmc as in ModelTC's configs: move it to quant.quant_out",
    "awq": "AWQ before GPTQ is a recipe now: write quant.method: [Awq, GPTQ] with AWQ's options under quant.special.Awq and GPTQ's under quant.special.GPTQ",
}

# What to change when the solver's float32 matrices do not fit (they do not shrink with the data).
HESSIAN_FIX = "a machine or device with more memory (the solver's float32 matrices do not shrink with calib settings)"


class GptqConfig(StrictModel):
    """``quant.special`` for ``method: GPTQ`` (see :class:`Gptq` for each field)."""

    actorder: bool = True
    static_groups: bool = True
    percdamp: float = Field(default=0.01, ge=0, le=10)
    blocksize: int = Field(default=128, gt=0)
    true_sequential: bool = True
    weighted_mse: bool = True
    forward_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        return reject_unsupported(data, UNSUPPORTED, "llmc's GPTQ")


class Gptq(Method):
    """GPTQ: accurate post-training quantization for generative transformers (Frantar et al., 2022,
    arXiv:2210.17323; reference implementations IST-DASLab/gptq and AutoGPTQ / GPTQModel).

    What it does, block by block on the cached calibration inputs: for every set of linear layers
    that read the same input (the adapter's linear groups; Llama: q/k/v, o, gate/up, down) it
    accumulates the input's Hessian ``H = 2XᵀX/n`` over all calibration batches (one forward, hooks
    on the layers' inputs; layers sharing an input share one ``H``), dampens it by ``percdamp ·
    mean(diag H)``, zeroes the weight columns of inputs that never fire (``H[i,i] = 0``, as the
    reference does), takes the Cholesky factor of ``H⁻¹``, and quantizes each layer column by column
    in blocks of ``blocksize`` columns, feeding each column's rounding error back into the columns
    not yet quantized. Rounding, scales and zero points are :mod:`llmc_core.quant`'s (``quant.weight``:
    2-8 bits, symmetric or not, per-tensor, per-channel or per-group, ``scale_dtype``, and
    ``calib_algo``: ``mse`` searches each group's range as the reference's ``mse`` quantizer does),
    so with ``H = I`` GPTQ is exactly RTN. A Hessian that is not positive definite after damping is retried
    with 10x the damping (logged), never producing NaNs. Each layer's GPTQ loss, damping and dead
    inputs are logged (``llmc.gptq``) and kept in ``self.log``.

    GPTQ's result is the quantized weight, not an equivalent float transform: the float block is
    left as it was (``transformed`` equals ``pretrain``) and ``quantize_block`` writes the integer
    weights computed during calibration. ``quant.quant_out: true`` (as in ModelTC's and the
    reference's GPTQ) quantizes each block right after it is solved, so the next block calibrates on
    the quantized block's outputs; with ``quant_out: false`` every block calibrates on the float
    model, and the integer codes of every layer (on CPU; half a byte per weight at 4 bits or
    fewer, one byte above) wait for the quantize stage.

    Memory: one block's Hessians at a time, float32 ``in × in`` per shared input (one at a time with
    ``true_sequential``); while one layer is solved, up to four such matrices are alive (``H``, the
    solver's damped/permuted copy, the Cholesky factor and its inverse). SmolLM2-135M: 1536² · 4 B =
    9 MB for down_proj. Llama-2-7B: 11008² · 4 B = 0.48 GB for down_proj (about 2 GB while it is
    solved), 0.2 GB for the other three inputs together. Llama-2/3-70B: down_proj's ``H`` is
    28672² · 4 B = 3.3 GB, about 13 GB while it is solved, plus the block (1.7 GB in fp16), the
    layer's float32 weight copies (0.94 GB each) and the cached activations. Those are, besides the
    block's inputs (``tokens × hidden``), the inputs its passes keep (o_proj's, ``tokens × hidden``;
    down_proj's, ``tokens × intermediate``, until down_proj is solved) and the known outputs of
    ``self_attn`` and ``mlp`` (``tokens × hidden`` each), in the model's dtype, or in ``forward_dtype`` when that is
    lower (all four are matmul outputs): at 128 × 512 tokens, 151 + 403 + 2 × 151 MB for SmolLM2
    in float32, half that with bfloat16 forwards; 0.5 + 1.4 + 2 × 0.5 GB for Llama-2-7B and
    1 + 3.8 + 2 × 1 GB for a 70B model in fp16.

    What it does not do: OWQ's float outlier columns, activation quantization, layers outside
    the decoder blocks (embeddings, ``lm_head``), or fused MoE experts (Mixtral, Qwen-MoE: refused
    before any work; their Hessians would need each expert's routed tokens).

    Forwards: each step's pass stops at its input set, and a submodule whose output is a solved
    layer's output (``self_attn`` → ``o_proj``, ``mlp`` → ``down_proj``, found by a probe forward,
    see :mod:`~llmc_plugins.methods.gptq.passes`) is replaced by that layer applied to the input
    its step kept. So ``true_sequential`` with ``quant_out`` costs one block forward plus the
    Hessians per block, and hands the quantized block's outputs to the next block; only the
    upper triangle of each ``XᵀX`` is computed.

    Example (ModelTC/llmc's GPTQ config, unchanged)::

        quant:
          method: GPTQ
          weight: {bit: 4, symmetric: false, granularity: per_group, group_size: 128}
          special:
            actorder: true
            static_groups: false
            percdamp: 0.01
            blocksize: 128
            true_sequential: true
          quant_out: true

    ``quant.special`` fields:

    - ``actorder`` (true; the reference and ModelTC default to false): quantize columns in
      descending ``diag H``. Without ``static_groups`` the groups are then formed in that order and
      each layer's ``g_idx`` maps columns to groups (``save_fake`` holds it; ``save_awq`` and
      ``real_quant`` need ``static_groups: true``). Why llmc turns it on: in models with massive
      activations (SmolLM2's ``down_proj`` in block 11 has one input channel with ``diag H``
      33,054 against a median of 0.044) the error of those channels' columns dominates the
      layer's, and act-order rounds them first, while every other column can still absorb their
      error; in column order they come when most columns are fixed. On that layer (16 x 512 C4
      samples, output error on 8 others) RTN 5.85, column order 0.63, act-order 0.05. Whole
      model, w4g64, 32 x 512 samples, 21 windows: RTN 27.297, column order 27.302, act-order with
      static groups 25.258, act-order with ``g_idx`` groups 25.611.
    - ``static_groups`` (true; the reference and ModelTC default to false): per-group scales and
      zero points computed once on the original weight's consecutive columns before any update,
      so act-order keeps the packed layout (``save_awq``, ``real_quant``, vLLM's fast kernels).
      ModelTC configs that set ``actorder: true`` and leave ``static_groups`` out get static
      groups here; set ``static_groups: false`` for the ``g_idx`` layout.
    - ``percdamp`` (0.01): damping, as a fraction of ``mean(diag H)``, added to ``diag H``.
    - ``blocksize`` (128): columns per lazy-update block (speed only; same result up to rounding).
    - ``true_sequential`` (true): solve the block's input sets in order (q/k/v, then o, then
      gate/up, then down), each on inputs computed with the earlier layers already quantized;
      false: all Hessians from one forward of the float block.

    - ``weighted_mse`` (true; only with ``quant.weight.calib_algo: mse``): each column's rounding
      error in the range search is weighted by its input's energy, ``diag H``, as the layer's
      output error weighs it; false: the reference's unweighted search. On SmolLM2 (w4 g64,
      act-order with static groups, output error on held-out tokens) it cuts block 28's
      ``down_proj`` error 3x against the unweighted search and keeps block 11's massive-activation
      ``down_proj`` at the minmax error, where the unweighted search quadruples it.
    - ``forward_dtype`` (auto): precision of the block forwards that produce the layers' inputs
      (hence the Hessians) and, with ``quant_out``, the next block's inputs. A lower precision
      than the model's runs under autocast: matmuls and attention in it, the residual stream and
      norms in the model's dtype, as mixed-precision inference runs. ``auto``: bfloat16 for a
      float32 model where the device runs it fast (CUDA with bf16, a CPU with AVX512-BF16 or
      AMX; the choice is logged, as AWQ's ``search_dtype: auto``), the model's dtype otherwise;
      ``float32`` (or the model's dtype): the block as it is. The solver and the Hessian sums
      stay float32 either way.
    Rejected with a reason: ``owq``, ``n_outs``, ``quant_out`` (belongs to ``quant``), ``awq`` (AWQ
    then GPTQ is the recipe ``quant.method: [Awq, GPTQ]``); any other unknown key is an error too.
    """

    name = "gptq"
    Config = GptqConfig

    def __init__(self, options: GptqConfig, weight: Any):
        super().__init__(options, weight)
        # full layer name -> QuantizedWeight solved in transform_block, written by quantize_block
        self.solved: dict[str, Any] = {}
        # block index -> the quantized block's outputs (quant_out), from transform_block to quantize_block
        self._outputs: dict[int, list[Any]] = {}

    @classmethod
    def accepts(cls, scheme: Any) -> list[str]:
        return []  # every weight format rounds through llmc_core.quant; activations are the runner's

    @classmethod
    def check(cls, run_config: Any) -> None:
        """Act-order without static groups stores a ``g_idx``: refuse the packed int4 layouts."""
        opts = run_config.special
        if opts is not None and "weighted_mse" in opts.model_fields_set and getattr(run_config.weight, "calib_algo", "minmax") != "mse":
            raise LlmcError("quant.special.weighted_mse weights calib_algo: mse's range search; set quant.weight.calib_algo: mse, or remove weighted_mse.")
        if opts is None or not opts.actorder or opts.static_groups:
            return
        why = "quant.special.actorder: true forms quantization groups in a permuted column order (g_idx), which the AWQ GEMM layout cannot hold; set quant.special.static_groups: true, or actorder: false"
        problems = []
        if run_config.save is not None and getattr(run_config.save, "save_awq", False):
            problems.append(f"save.save_awq: {why}, or save with save_fake.")
        if "real_quant" in run_config.positions():
            problems.append(f"eval.eval_pos: real_quant: {why}, or measure fake_quant.")
        if problems:
            raise LlmcError(*problems)

    @classmethod
    def memory(cls, shapes: Any, options: GptqConfig, samples: int, seq_len: int) -> list[Any]:
        """Besides the block's inputs and outputs: the kept o_proj output (``tokens × hidden``) and
        down_proj input (``tokens × intermediate``) of the passes, the Hessians (float32 ``in × in``;
        four alive while the widest layer is solved, or every set's at once without
        ``true_sequential``) and the solved layer's float32 copies (weight, codes)."""
        from llmc_core.preflight import Part

        act, tokens = shapes.dtype_bytes, samples * seq_len  # forward_dtype below the model's halves these; the estimate keeps the upper bound
        widest = shapes.widest_input
        ins = [shapes.hidden, shapes.attn_width, shapes.hidden, widest]
        hessians = 4 * widest**2 * 4 if options.true_sequential else (sum(i * i for i in ins) + 3 * widest**2) * 4
        return [
            Part("GPTQ kept inputs", tokens * (shapes.hidden + shapes.mlp_width) * act),
            Part("GPTQ Hessians", hessians, fix=HESSIAN_FIX if options.true_sequential else "quant.special.true_sequential: true (one input set's Hessian at a time)"),
            Part("GPTQ layer copies", 3 * widest * max(shapes.hidden, shapes.mlp_width) * 4, fix=HESSIAN_FIX),
        ]

    # -- runner hooks ----------------------------------------------------------------------------

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        fused = [n for n, w in adapter.named_quant_linears().items() if not hasattr(w, "register_forward_pre_hook")]
        if fused:  # a view into a 3-D expert tensor: its inputs (the tokens routed to it) are not observable
            raise LlmcError(f"GPTQ cannot solve fused MoE expert weights ({len(fused)} of them, e.g. {fused[0]}): their Hessians need each expert's routed tokens, which llmc's GPTQ does not collect. Use quant.method: Awq or RTN for this model.")

    def transform_block(self, ctx: Any) -> None:
        from llmc_plugins.methods.gptq.passes import BlockPasses

        linears = ctx.adapter.quant_linears(ctx.block)
        steps = self._steps(ctx, linears)
        originals = {n: m.weight.data for n, m in linears.items()}
        passes = BlockPasses(ctx, linears, self._forward_dtype(next(iter(linears.values())).weight))
        try:
            for k, step in enumerate(steps):
                # The first pass sees the float block: run to the end when its outputs are wanted
                # (not with quant_out, and not when a transform before GPTQ computed them already).
                later = ctx.quant_out or k < len(steps) - 1  # another pass follows this one
                hessians, outputs = passes.run(step, to_end=k == 0 and not ctx.quant_out and not ctx.outputs, keep=later)
                if outputs:
                    ctx.outputs = outputs
                for group in step:
                    h = hessians.pop(group[0]).value()
                    for name in group:
                        self._solve(ctx, name, linears[name], originals[name], h)
                    del h
                    passes.mark_solved(group)
            if ctx.quant_out:  # the quantized block's outputs: what is known already is not recomputed
                self._outputs[ctx.index] = passes.run([], to_end=True, keep=False)[1]
        finally:
            for n, m in linears.items():  # the float block leaves transform_block as it came in
                m.weight.data = originals[n]

    def _forward_dtype(self, weight: Any) -> Any:
        """The autocast dtype of the block's forwards, or None (the block's own dtype)."""
        import torch

        from llmc_plugins.methods.awq.precision import auto_search_dtype

        name = self.options.forward_dtype
        dtype = auto_search_dtype(weight.dtype, weight.device, key="forward_dtype") if name == "auto" else getattr(torch, name)
        return dtype if torch.finfo(dtype).bits < torch.finfo(weight.dtype).bits else None

    def _solve(self, ctx: Any, name: str, layer: Any, original: Any, h: Any) -> None:
        """Quantize one layer against ``h``; later input sets see it quantized."""
        from llmc_plugins.methods.gptq.solver import gptq_quantize

        opts = self.options
        full = f"{ctx.prefix}.{name}"
        start = time.perf_counter()
        res = gptq_quantize(original, h, self.weight, opts.blocksize, opts.percdamp, opts.actorder, opts.static_groups, full, weighted=opts.weighted_mse)
        self.solved[full] = _to_cpu(res.weight)
        layer.weight.data = res.weight.dequantize(layer.weight.dtype).to(layer.weight.device)
        seconds = time.perf_counter() - start
        log.info("block %d %s: loss %.4g, damp %.3g%s%s, %.2f s", ctx.index, name, res.loss, res.damp, f" (raised {res.retries}x)" if res.retries else "", f", {res.dead} dead inputs" if res.dead else "", seconds)
        self.log.append({"block": ctx.index, "layer": name, "loss": res.loss, "damp": res.damp, "retries": res.retries, "dead": res.dead, "seconds": round(seconds, 3)})

    def quantize_block(self, ctx: Any) -> dict[str, Any]:
        import torch

        out = {}
        with torch.no_grad():
            for name, linear in ctx.adapter.quant_linears(ctx.block).items():
                full = f"{ctx.prefix}.{name}"
                qw = self.solved.pop(full, None)
                if qw is None:
                    raise LlmcError(f"GPTQ: no solved weight for {full}; the calibration pass did not reach this layer. Rerun without --resume, or report the bug.")
                linear.weight.data.copy_(qw.dequantize(linear.weight.dtype).to(linear.weight.device))
                out[full] = qw
        if ctx.quant_out and ctx.index in self._outputs:  # computed in transform_block on these very weights
            ctx.outputs = self._outputs.pop(ctx.index)
        return out

    # -- resume ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The solved layers not yet written (``quant_out: false``: every finished block's; one
        byte per weight, rewritten with each block checkpoint)."""
        solved = {}
        for name, q in self.solved.items():
            entry = {"codes": q.codes, "scales": q.scales, "zeros": q.zeros, "spec": q.spec.model_dump()}
            if q.g_idx is not None:
                entry["g_idx"] = q.g_idx
            solved[name] = entry
        return {"solved": solved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from llmc_core.quant import QuantizedWeight, QuantSpec

        self.solved = {n: QuantizedWeight(q["codes"], q["scales"], q["zeros"], QuantSpec(**q["spec"]), q.get("g_idx")) for n, q in state.get("solved", {}).items()}

    # -- what is solved when ---------------------------------------------------------------------

    def _steps(self, ctx: Any, linears: dict[str, Any]) -> list[list[list[str]]]:
        """Input sets (lists of layer names sharing an input), grouped into solving steps: one set
        per step with ``true_sequential``, all sets in one step otherwise. Layers the adapter's
        groups do not name get their own set, after the others."""
        try:
            groups = [list(g.layers) for g in ctx.adapter.linear_groups(ctx.block)]
        except NotImplementedError:
            groups = []
        named = {n for g in groups for n in g}
        unknown = [n for g in groups for n in g if n not in linears]
        if unknown:
            raise LlmcError(f"GPTQ: the model adapter names layers that are not quantized linear layers of block {ctx.index}: {', '.join(unknown)}; the adapter's linear groups are wrong for this model.")
        sets = groups + [[n] for n in linears if n not in named]
        return [[s] for s in sets] if self.options.true_sequential and groups else [sets]


def _to_cpu(qw: Any) -> Any:
    from dataclasses import replace

    return replace(qw, codes=qw.codes.cpu(), scales=qw.scales.cpu(), zeros=qw.zeros.cpu(), g_idx=None if qw.g_idx is None else qw.g_idx.cpu())
