"""The ``Awq`` method: per-block scale search and folding, then optional weight clipping."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from llmc_core.api import Method, StrictModel
from llmc_core.errors import LlmcError
from llmc_core.schema import reject_unsupported

log = logging.getLogger("llmc.awq")

# Keys ModelTC/llmc reads for AWQ (or for every block-wise method) that llmc does not implement:
# rejected with the reason instead of being silently ignored.
UNSUPPORTED = {
    "do_gqa_trans": "scaling o_proj against v_proj under grouped-query attention is not implemented; remove the key (the o_proj group is skipped, as ModelTC does by default)",
    "true_sequential": "AWQ in llmc always searches groups in order on the float block; remove the key",
    "search_clip_init": "clip-initialisation for learnable-range methods is not implemented; use weight_clip: true",
    "online_rotate": "online rotation belongs to QuaRot/SpinQuant, not AWQ; remove the key",
}


# The scale search's loss runs on the first calibration tokens up to this many (whole sub-batches);
# the statistics it searches over use every token. See ``search_tokens`` in :class:`Awq`.
SEARCH_TOKENS = 16384


class AwqConfig(StrictModel):
    """``quant.special`` for ``method: Awq`` (see :class:`Awq` for each field)."""

    trans: bool = True
    trans_version: Literal["v1", "v2"] = "v2"
    n_grid: int = Field(default=20, ge=1, le=200)
    alpha_search: Literal["grid", "coarse_to_fine"] = "grid"
    awq_bs: int | None = Field(default=None, gt=0)
    search_tokens: int | None = Field(default=SEARCH_TOKENS, gt=0)
    search_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    weight_clip: bool = False
    clip_version: Literal["v1", "v2"] = "v1"
    clip_sym: bool | None = None
    clip_grid: int = Field(default=20, ge=1, le=200)
    max_shrink: float = Field(default=0.5, gt=0, lt=1)
    clip_tokens: int = Field(default=512, gt=0)
    clip_check: bool = True
    save_scale: bool = False
    scale_path: str | None = None
    save_clip: bool = False
    clip_path: str | None = None
    save_mem: bool = True

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        return reject_unsupported(data, UNSUPPORTED, "llmc's AWQ")

    @model_validator(mode="after")
    def _paths_when_saving(self) -> AwqConfig:
        if self.save_scale and not self.scale_path:
            raise ValueError("save_scale: true needs scale_path (a folder for scales.pth)")
        if self.save_clip and not self.clip_path:
            raise ValueError("save_clip: true needs clip_path (a folder for clips.pth)")
        if self.save_clip and not self.weight_clip:
            raise ValueError("save_clip: true needs weight_clip: true (there are no clip ranges to save)")
        if self.save_scale and not self.trans:
            raise ValueError("save_scale: true needs trans: true (there are no scales to save)")
        return self


class Awq(Method):
    """AWQ: activation-aware weight quantization (Lin et al., 2023, arXiv:2306.00978).

    What it does, block by block on the cached calibration inputs: for each group of linear layers
    that read the same input (Llama: q/k/v after the attention norm, o after v, gate/up after the MLP
    norm, down after up) it searches a per-input-channel scale ``s = mean|x|^a`` over the grid
    ``a = 0, 1/n_grid, ..., (n_grid-1)/n_grid`` (``trans_version: v1`` adds AutoAWQ's duo scaling
    ``/ mean|w|^(1-a)``), normalised by ``sqrt(max(s)·min(s))``. The loss of a candidate is the mean
    squared error of the group's inspect module (attention, MLP, or the layer itself) with weights
    ``Q(W·diag(s))`` on inputs ``x/s``, summed over all calibration batches before choosing. The
    best ``s`` is folded into the producing op (norm weight or previous layer's rows ``/= s``) and
    the layers' input columns (``*= s``), so the float model computes the same function. With
    ``weight_clip`` it then searches, per output row and quantization group, how far to shrink the
    weight range (anchors' grid, q/k excluded) on a token subsample. Quantization itself is RTN
    under ``quant.weight``. The chosen alpha and loss of every group are logged (``llmc.awq``) and
    kept in ``self.log``.

    Cost per block: one float forward of the block records everything the searches need, as in
    llm-awq (inspect-module calls, ``|x|`` means, ``X^T X`` for o/down, the clip subsample's Gram
    matrices, the block outputs); folding is exact, so those stay valid after each fold and the
    block outputs become the next block's inputs without another forward (unless ``clip_version:
    v1`` clamps the float weights). Then ``n_grid`` forwards of the attention and of the MLP in the
    search precision, and the clip check's two block forwards on at most 16384 tokens.

    Memory: the scale search quantizes its grid one candidate (or a few, up to 256 MB) at a time, so
    it needs the block, its captured activations and a few float32 copies of the largest layer
    whatever ``n_grid`` is: 180 MB per copy for a Llama-2-7B down_proj, 0.94 GB for a 70B one (the
    whole 20-point grid at once would be 3.6 GB and 19 GB).

    What it does not do: fold into embeddings or ``lm_head`` (SmolLM2 ties them), scale o_proj
    under grouped-query attention (the group is skipped and logged, as ModelTC does by default),
    quantize activations, or choose on the first batch only (ModelTC does; llmc sums all batches).

    Example (ModelTC/llmc's seed config, unchanged)::

        quant:
          method: Awq
          weight: {bit: 4, symmetric: true, granularity: per_group, group_size: 128}
          special:
            trans: true
            trans_version: v2
            weight_clip: true
            clip_sym: true

    ``quant.special`` fields:

    - ``trans`` (true): run the scale search; false leaves only clipping.
    - ``trans_version`` (v2): ``v2`` is llm-awq's ``s = mean|x|^a``; ``v1`` is the duo scaling
      ``mean|x|^a / mean|w|^(1-a)`` (``mean|w|``: ``|W|`` over its group max, averaged over rows and
      layers); v1 also tries ``s = 1`` so it never loses to RTN.
    - ``n_grid`` (20): grid points of the scale search.
    - ``alpha_search`` (grid): ``grid`` measures the loss at every grid point, as the anchors do;
      ``coarse_to_fine`` measures every 4th point, then halves the step around the best (9 of 20
      points), which finds the grid's best alpha whenever the loss is unimodal in alpha. It
      applies to the groups searched through attention or the MLP (the costly forwards); the
      groups searched through one linear layer always take the whole grid.
    - ``search_dtype`` (auto): precision of the search's forward passes through attention/MLP
      (the reference output included). ``auto`` is the model's dtype for fp16/bf16 models; for
      float32 models it is bfloat16 where the device runs bf16 fast (CUDA with bf16; CPUs with
      AVX512-BF16 or AMX: on SmolLM2 the same alphas as float32, 2-4x faster) and float32 elsewhere
      (an AVX2-only CPU emulates bf16 about 44x slower); the choice and its reason are logged once
      (``llmc_plugins.methods.awq.precision``). Folding and the loss sums stay float32.
    - ``awq_bs`` (none): split each calibration batch into sub-batches of this many samples for the
      search's forward passes (memory only; the loss is the same). Default: as many samples as
      make 8192 tokens, so memory does not grow with ``calib.n_samples``.
    - ``search_tokens`` (16384): the scale search's loss (``n_grid`` forwards of attention and of
      the MLP) runs on the first calibration samples up to this many tokens (whole sub-batches);
      the per-channel statistics the candidates are built from use every token, and groups
      searched through one linear layer (v→o, up→down) use every token too. It caps the
      search's cost and the memory of its recorded inputs when ``calib.n_samples`` grows (with
      128 x 512 samples: a quarter of the forwards). ``null``: every token, as the anchors do.
    - ``weight_clip`` (false): search weight clipping after scaling.
    - ``clip_version`` (v1): ``v1`` clamps the float weights in place (``transformed`` includes the
      clipping); ``v2`` keeps the float weights and clamps when quantizing (``transformed`` equals
      ``pretrain``); the quantized model is the same.
    - ``clip_sym`` (``quant.weight.symmetric``): clip to ``±max|w|·f`` instead of ``[min·f, max·f]``.
    - ``clip_grid`` (20) and ``max_shrink`` (0.5): shrink factors ``1 - i/clip_grid`` for
      ``i < max_shrink·clip_grid``.
    - ``clip_tokens`` (512, the anchors' value): tokens in the clip search's subsample (every k-th
      token). It does not grow with ``calib.n_samples``; raise it with them (on SmolLM2 w4 g64,
      128 samples: 4096 tokens gave PPL 24.30 against 24.48 with 512).
    - ``clip_check`` (true): keep a block's clipping only if the block's quantized output error does
      not grow, measured on the first calibration samples up to 16384 tokens (two block forwards).
    - ``save_scale`` / ``scale_path``: write ``{layer: s}`` to ``scale_path/scales.pth``.
    - ``save_clip`` / ``clip_path``: write ``{layer: {lo, hi}}`` to ``clip_path/clips.pth``, as
      entries ``<layer>.lo`` and ``<layer>.hi``. Both files keep ModelTC's names but hold
      safetensors, not pickles: read them with ``safetensors.torch.load_file``. They are written
      once, after the last block; an existing file is refused at validation unless
      ``save.overwrite: true``.
    - ``save_mem`` (true): accepted for ModelTC configs; llmc always frees the search buffers.

    Rejected with a reason: ``do_gqa_trans``, ``true_sequential``, ``search_clip_init``,
    ``online_rotate``; any other unknown key is an error too.
    """

    path_keys = ("scale_path", "clip_path")
    name = "awq"
    Config = AwqConfig

    def __init__(self, options: AwqConfig, weight: Any):
        super().__init__(options, weight)
        self.scales: dict[str, Any] = {}
        self.clips: dict[str, Any] = {}

    @classmethod
    def memory(cls, shapes: Any, options: AwqConfig, samples: int, seq_len: int) -> list[Any]:
        """Besides the block's inputs and outputs: the recorded calls and outputs of the attention
        and MLP (``search_tokens`` tokens, ``tokens × hidden`` each), the outputs' joined copy when
        a batch runs in several chunks, the search's forwards on chunks of 8192 tokens (the runner's
        take 4096), ``XᵀX`` of o_proj's and down_proj's inputs and a few candidate copies of down_proj."""
        from llmc_core.preflight import FORWARD_TOKENS, Part
        from llmc_plugins.methods.awq.capture import CHUNK_TOKENS

        act, h, tokens = shapes.dtype_bytes, shapes.hidden, samples * seq_len
        chunk = max(seq_len, CHUNK_TOKENS // seq_len * seq_len) if options.awq_bs is None else options.awq_bs * seq_len
        recorded = tokens if options.search_tokens is None else min(tokens, -(-options.search_tokens // chunk) * chunk)
        one_call = 3 * shapes.mlp_width + 4 * h
        return [
            Part("AWQ recorded calls", 4 * recorded * h * act, fix="a smaller quant.special.search_tokens"),
            Part("AWQ joined outputs", tokens * h * act if tokens > chunk else 0),
            Part("AWQ search slice", max(0, min(tokens, chunk) - min(tokens, FORWARD_TOKENS)) * one_call * act, fix="quant.special.awq_bs (samples per search forward)"),
            Part("AWQ Gram matrices", (shapes.attn_width**2 + shapes.widest_input**2) * 4, fix="a machine with more memory"),
            Part("AWQ candidates", 2 * 4 * shapes.widest_input * h * 4, fix="a machine with more memory"),
        ]

    # -- runner hooks ----------------------------------------------------------------------------

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        adapter.check_linear_groups("AWQ")

    def transform_block(self, ctx: Any) -> None:
        import torch

        from llmc_plugins.methods.awq import capture
        from llmc_plugins.methods.awq.clip import clip_group_size, clippable

        opts = self.options
        targets = self._targets(ctx) if opts.trans else []
        linears = ctx.adapter.quant_linears(ctx.block)
        clip_layers = {}
        if opts.weight_clip:  # fused expert views are not modules whose inputs can be hooked: not clipped
            clip_layers = {n: (m, clip_group_size(self.weight, m.in_features)) for n, m in linears.items() if clippable(n) and isinstance(m, torch.nn.Module)}
        first = next(iter(linears.values()))
        dtype = self._search_dtype(first)
        cap = capture.capture_block(ctx, [t for t, _ in targets], clip_layers, opts.clip_tokens, None if dtype == first.weight.dtype else dtype, opts.awq_bs, opts.search_tokens)
        self._tell_search_tokens(ctx, cap)
        folded: dict[str, Any] = {}
        for target, group in targets:
            s = self._scale_group(ctx, target, group, cap, dtype)
            if s is not None:
                folded.update(dict.fromkeys(group.layers, s))
        self._log_expert_tokens(ctx, cap)
        changed = False
        if opts.weight_clip:
            changed = self._clip_block(ctx, clip_layers, cap, folded) and opts.clip_version == "v1"
        if not changed:
            # Folding is exact: the float block's outputs are the ones captured before it.
            ctx.outputs = cap.outputs

    def quantize_block(self, ctx: Any) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            for name, linear in ctx.adapter.quant_linears(ctx.block).items():
                rng = self.clips.get(f"{ctx.prefix}.{name}") if self.options.clip_version == "v2" else None
                if rng is not None:  # deferred clipping: clamp now, just before rounding
                    linear.weight.data.copy_(rng.to(linear.weight.device).apply(linear.weight.data))
        return super().quantize_block(ctx)

    # -- lifecycle: validation, resume, end of run -------------------------------------------------

    @classmethod
    def accepts(cls, scheme: Any) -> list[str]:
        """Integer weights (the search rounds them); activation and KV quantizers are the runner's."""
        if scheme.weight.is_float:
            return [f"AWQ's scale and clip searches round integer weights, not {scheme.weight.describe()}; use RTN or GPTQ for float weights."]
        return []

    @classmethod
    def transform_problems(cls, options: Any) -> list[str]:
        if options.weight_clip and options.clip_version == "v2":
            return ["clip_version: v2 clamps at quantization time, which the method after AWQ does; use clip_version: v1 (the clamp is folded into the float weights) or weight_clip: false"]
        return []

    @classmethod
    def check(cls, run_config: Any) -> None:
        opts = run_config.special
        overwrite = bool(run_config.save is not None and run_config.save.overwrite) or run_config.resume
        problems = []
        for key, path in cls._files(opts):
            if path.parent.exists() and not path.parent.is_dir():
                problems.append(f"quant.special.{key}: {path.parent} is a file. Give a folder for {path.name}.")
            elif path.exists() and not overwrite:
                problems.append(f"quant.special.{key}: {path} already exists. Choose another {key}, remove the file, or set save.overwrite: true.")
        if problems:
            raise LlmcError(*problems)

    def state_dict(self) -> dict[str, Any]:
        """The scales (``save_scale``) and clipping ranges (clip v2 or ``save_clip``) found so far."""
        return {"scales": dict(self.scales), "clips": {n: {"lo": r.lo, "hi": r.hi, "shrink": r.shrink} for n, r in self.clips.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from llmc_plugins.methods.awq.clip import ClipRange

        self.scales = dict(state["scales"])
        self.clips = {n: ClipRange(r["lo"], r["hi"], r["shrink"]) for n, r in state["clips"].items()}

    def finish(self, overwrite: bool) -> None:
        """Write ``scales.pth`` / ``clips.pth`` (safetensors) once every block is done."""
        from safetensors.torch import save_file

        from llmc_core.fsutil import atomic_file

        for key, path in self._files(self.options):
            if key == "scale_path":
                tensors = {n: s.detach().cpu().clone() for n, s in self.scales.items()}  # clones: q/k/v share one s
            else:
                tensors = {f"{n}.{part}": getattr(r, part).cpu().contiguous() for n, r in self.clips.items() for part in ("lo", "hi")}
            with atomic_file(path, overwrite=overwrite) as tmp:
                save_file(tensors, str(tmp))
            log.info("wrote %s", path)

    @staticmethod
    def _files(opts: AwqConfig) -> list[tuple[str, Path]]:
        """``(config key, file)`` of each file the options ask to write."""
        out = []
        if opts.save_scale:
            out.append(("scale_path", Path(opts.scale_path) / "scales.pth"))
        if opts.save_clip:
            out.append(("clip_path", Path(opts.clip_path) / "clips.pth"))
        return out

    # -- scale search ----------------------------------------------------------------------------

    def _targets(self, ctx: Any) -> list[tuple[Any, Any]]:
        """The adapter's linear groups resolved to weights (skipped ones logged), with their groups."""
        from llmc_plugins.methods.awq import scale_search as ss
        from llmc_plugins.methods.awq.capture import Target

        block, adapter, out = ctx.block, ctx.adapter, []
        for group in adapter.linear_groups(block):
            reason = group.extra.get("skip")
            if reason:
                log.info("block %d %s: skipped (%s)", ctx.index, group.name, reason)
                self.log.append({"block": ctx.index, "group": group.name, "skipped": reason})
                continue
            layers = [adapter.get(block, n) for n in group.layers]
            size = ss.fold_target_size(adapter.get(block, group.prev))
            if size != layers[0].in_features:
                raise LlmcError(f"AWQ: cannot fold scales of group '{group.name}' into {group.prev} ({size} outputs) for layers with {layers[0].in_features} inputs; the model adapter's linear groups are wrong for this model.")
            inspect = layers[0] if group.inspect in ("", group.layers[0]) else adapter.get(block, group.inspect)
            out.append((Target(group.name, inspect, layers, linear=len(layers) == 1 and inspect is layers[0]), group))
        return out

    def _scale_group(self, ctx: Any, target: Any, group: Any, cap: Any, dtype: Any) -> Any:
        """Search ``target``'s scales on what ``cap`` recorded, fold the best; returns it (None
        for an expert that received no calibration tokens)."""
        import torch

        from llmc_plugins.methods.awq import scale_search as ss

        start = time.perf_counter()
        layers = target.layers
        w_mean = ss.weight_mean(layers, self.weight) if self.options.trans_version == "v1" else None
        if target.linear:
            lin = cap.linears.pop(target.name)
            if lin.act.count == 0:  # an expert no calibration token reached: RTN quantizes it as it is
                log.info("block %d %s: skipped (no calibration tokens reached this expert)", ctx.index, group.name)
                self.log.append({"block": ctx.index, "group": group.name, "skipped": "no calibration tokens"})
                return None
            cand = ss.candidates(lin.act.mean(), w_mean, self.options.n_grid)
            losses = ss.linear_losses(layers[0], lin.gram, lin.act.count, cand, self.weight)
        else:
            mod = cap.modules.pop(target.name)
            cand = ss.candidates(mod.act.mean(), w_mean, self.options.n_grid)
            losses = ss.module_losses(target.inspect, layers, mod, cand, self.weight, self.options.awq_bs, dtype, self.options.alpha_search)
        best = int(torch.argmin(losses))
        identity = cand.alphas.index(None) if None in cand.alphas else 0
        s = cand.scales[best]
        adapter = ctx.adapter
        ss.fold_scales(adapter.get(ctx.block, group.prev), layers, s, adapter.norm_offset, tuple(adapter.get(ctx.block, n) for n in group.also_scale))
        alpha, loss, rtn = cand.alphas[best], float(losses[best]), float(losses[identity])
        seconds = time.perf_counter() - start
        shown = "identity" if alpha is None else f"{alpha:.2f}"
        log.info("block %d %s: alpha=%s loss=%.4g (alpha 0 / RTN: %.4g, %+.1f%%) %.1f s", ctx.index, group.name, shown, loss, rtn, 100 * (loss / rtn - 1) if rtn else 0.0, seconds)
        self.log.append({"block": ctx.index, "group": group.name, "alpha": alpha, "loss": loss, "loss_rtn": rtn, "seconds": round(seconds, 2)})
        if self.options.save_scale:
            for n in group.layers:
                self.scales[f"{ctx.prefix}.{n}"] = s.detach().cpu()
        return s

    def _log_expert_tokens(self, ctx: Any, cap: Any) -> None:
        for counts in cap.expert_tokens.values():
            few = sum(c < MIN_EXPERT_TOKENS for c in counts)
            log.info("block %d experts: %d of %d got fewer than %d calibration tokens (min %d, max %d); all are quantized", ctx.index, few, len(counts), MIN_EXPERT_TOKENS, min(counts), max(counts))
            self.log.append({"block": ctx.index, "group": "experts", "tokens": counts, "few_tokens": few})

    def _tell_search_tokens(self, ctx: Any, cap: Any) -> None:
        """Log once per run when the scale search's loss runs on a subsample of the tokens."""
        if getattr(self, "_told_search_tokens", False) or not cap.modules:
            return
        total = sum(h.shape[0] * h.shape[1] for h in ctx.inputs)
        used = max(m.tokens for m in cap.modules.values())
        if used < total:
            log.info("scale search: the loss runs on the first %d of %d calibration tokens per block (quant.special.search_tokens: %d; null for all), the statistics on all", used, total, self.options.search_tokens)
        self._told_search_tokens = True

    def _search_dtype(self, layer: Any) -> Any:
        import torch

        from llmc_plugins.methods.awq.precision import auto_search_dtype

        name = self.options.search_dtype
        if name == "auto":
            return auto_search_dtype(layer.weight.dtype, layer.weight.device)
        return getattr(torch, name)

    # -- weight clipping -------------------------------------------------------------------------

    def _clip_block(self, ctx: Any, linears: dict[str, Any], cap: Any, folded: dict[str, Any]) -> bool:
        """Search and record each clippable layer's range; returns whether the block keeps them."""
        import torch

        from llmc_plugins.methods.awq.clip import rescale_grams, search_clip

        start = time.perf_counter()
        opts = self.options
        sym = self.weight.symmetric if opts.clip_sym is None else opts.clip_sym
        ranges, errs = {}, {}
        for name, (layer, _) in linears.items():
            g, tokens = cap.clip_grams.pop(name)
            if name in folded:  # the layer now reads x / s
                g = rescale_grams(g, folded[name])
            ranges[name], before, after = search_clip(layer.weight.data, g, tokens, self.weight, sym, opts.clip_grid, opts.max_shrink)
            errs[name] = (before, after, float((ranges[name].shrink < 1).float().mean()))
        kept = True
        if opts.clip_check:
            plain = block_quant_loss(ctx, cap.outputs, self.weight, {})
            clipped = block_quant_loss(ctx, cap.outputs, self.weight, ranges)
            kept = clipped <= plain
            log.info("block %d clip: block loss %.4g -> %.4g%s", ctx.index, plain, clipped, "" if kept else " (worse: clipping dropped for this block)")
            self.log.append({"block": ctx.index, "group": "clip", "loss_rtn": plain, "loss": clipped, "kept": kept})
        for name, (before, after, frac) in errs.items():
            log.debug("block %d clip %s: error %.4g -> %.4g, %.0f%% of groups clipped", ctx.index, name, before, after, 100 * frac)
        if kept:
            with torch.no_grad():
                for name, rng in ranges.items():
                    full = f"{ctx.prefix}.{name}"
                    if opts.clip_version == "v1":
                        linears[name][0].weight.data.copy_(rng.apply(linears[name][0].weight.data))
                    if opts.clip_version == "v2" or opts.save_clip:
                        self.clips[full] = rng.to("cpu") if opts.clip_version == "v1" else rng
        log.info("block %d clip: %d layers in %.1f s", ctx.index, len(linears), time.perf_counter() - start)
        return kept


# An expert with fewer calibration tokens than this is counted in the log (its scales rest on little data).
MIN_EXPERT_TOKENS = 16

# The clip check's block forwards use at most this many tokens of the calibration set (the first
# samples): it is a guard against clipping that hurts the block, not a search, and two full-set
# block forwards per block would cost as much as the scale search with 128 samples.
CHECK_TOKENS = 16384


def block_quant_loss(ctx: Any, reference: list[Any], spec: Any, ranges: dict[str, Any], max_tokens: int = CHECK_TOKENS) -> float:
    """Mean squared error of the block with every linear layer fake-quantized (clamped first to
    ``ranges[name]`` where given) against ``reference`` outputs (one per cached batch), on the
    first ``max_tokens`` tokens of the cached batches; the weights are restored after."""
    import torch

    from llmc_core.blockwise import sub_batches
    from llmc_core.layer_ops import original_weight, set_weight
    from llmc_core.quant.fake import fake_quantize

    inputs, kwargs, kept = sub_batches(ctx.inputs, ctx.kwargs, max_tokens)
    linears = ctx.adapter.quant_linears(ctx.block)
    originals = {n: original_weight(m) for n, m in linears.items()}
    try:
        with torch.no_grad():
            for n, m in linears.items():
                w = ranges[n].apply(m.weight.data) if n in ranges else m.weight.data
                set_weight(m, fake_quantize(w, spec))
            outs = ctx.forward(inputs, kwargs)
    finally:
        for n, m in linears.items():
            set_weight(m, originals[n])
    refs = [r[part] for r, part in zip(reference, kept)]
    total = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, refs))
    return total / sum(r.numel() for r in refs)
