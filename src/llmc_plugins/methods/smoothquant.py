"""SmoothQuant: move activation outliers into the weights before W8A8 quantization."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, model_validator

from llmc_core import hookimpl
from llmc_core.api import Method, StrictModel

log = logging.getLogger("llmc.smoothquant")


class SmoothQuantConfig(StrictModel):
    """``quant.special`` for ``method: SmoothQuant`` (see :class:`SmoothQuant`)."""

    alpha: float = Field(default=0.8, ge=0, le=1)
    groups: list[str] | None = None
    alpha_search: bool = False
    alpha_grid: list[float] = Field(default_factory=lambda: [round(0.05 * i, 2) for i in range(4, 21)])
    search_tokens: int = Field(default=8192, gt=0)

    @model_validator(mode="after")
    def _grid_in_range(self) -> SmoothQuantConfig:
        if not self.alpha_grid or any(not 0 <= a <= 1 for a in self.alpha_grid):
            raise ValueError("alpha_grid: give one or more alphas between 0 and 1")
        return self


class SmoothQuant(Method):
    """SmoothQuant (Xiao et al., 2023, arXiv:2211.10438; reference mit-han-lab/smoothquant).

    What it does, block by block on the cached calibration inputs: one float forward records, for
    each group of linear layers that read the same input (the family table AWQ uses: the norm
    before q/k/v, the norm before gate/up, v before o where the heads allow it, up before down),
    the per-channel maximum ``max|X_j|`` over every calibration token. The scale
    ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``max|W_j|`` over the group's weight
    columns; both clamped below at 1e-5, as the reference does) is folded into the op that
    produces the input (``/ s``) and the layers' input columns (``* s``): the float model computes
    the same function (``transformed`` equals ``pretrain`` to float rounding), while the inputs the
    activation quantizer sees have their outlier channels flattened.

    With ``alpha_search: true`` each block tries every ``alpha_grid`` value instead (one alpha for
    the whole block): the block is smoothed, its weights rounded by RTN under ``quant.weight`` and
    its linear inputs quantized under ``quant.act``, and the alpha whose block output is closest
    (mean squared error) to the float block's on the first ``search_tokens`` calibration tokens
    wins; the choice is logged. Like llm-compressor's and ModelTC's options it costs one block
    forward per grid point.

    Alone (``quant.method: SmoothQuant``) the weights are then rounded to nearest under
    ``quant.weight``, as ModelTC's SmoothQuant does; in a recipe (``[SmoothQuant, GPTQ]``) the
    method after it quantizes the smoothed block.

    What it does not do: smooth inputs no hook can observe (a fused MoE expert's down_proj input;
    logged and skipped), or fold into embeddings or ``lm_head``.

    Example (ModelTC/llmc's ``smoothquant_w_a.yml``)::

        quant:
          method: SmoothQuant
          weight: {bit: 8, symmetric: true, granularity: per_channel}
          act: {bit: 8, symmetric: true, granularity: per_token}
          special: {alpha: 0.8}

    ``quant.special`` fields:

    - ``alpha`` (0.8, ModelTC's default; the reference's 0.5): migration strength, 0 to 1.
    - ``groups`` (all): the family-table group names to smooth (Llama: ``qkv``, ``o``,
      ``gate_up``, ``down``; llm-compressor's default mappings are ``[qkv, gate_up]``).
    - ``alpha_search`` (false), ``alpha_grid`` (0.2, 0.25, ..., 1.0), ``search_tokens`` (8192):
      the per-block search above.
    """

    name = "smoothquant"
    Config = SmoothQuantConfig

    @classmethod
    def memory(cls, shapes: Any, options: SmoothQuantConfig, samples: int, seq_len: int) -> list[Any]:
        """Besides the block's inputs and outputs: one ``|x|`` copy of a layer input per forward
        slice (the maxima themselves are a few KB); with ``alpha_search`` a copy of the block and
        the trial's outputs on ``search_tokens`` tokens."""
        from llmc_core.preflight import FORWARD_TOKENS, Part

        tokens = samples * seq_len
        parts = [Part("SmoothQuant |x|", min(tokens, FORWARD_TOKENS) * shapes.mlp_width * 4)]
        if options.alpha_search:
            search = min(tokens, options.search_tokens)
            parts.append(Part("SmoothQuant search", shapes.block_params() * shapes.dtype_bytes + search * shapes.hidden * shapes.dtype_bytes, fix="quant.special.SmoothQuant.search_tokens smaller, or alpha_search: false"))
        return parts

    @classmethod
    def accepts(cls, scheme: Any) -> list[str]:
        return []  # a float transform; the rounding (RTN alone) is llmc_core.quant's, activations the runner's

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        adapter.check_linear_groups("SmoothQuant")

    def transform_block(self, ctx: Any) -> None:
        import torch

        from llmc_core.blockwise import sub_batches

        targets = self._targets(ctx)
        if not targets:
            return
        with torch.no_grad():
            act_max, outputs = _observe(ctx, targets)
            ctx.outputs = outputs  # the fold is exact: these are the smoothed block's outputs too
            weight_max = {t["name"]: _weight_max(t["layers"]) for t in targets}
            alpha = self.options.alpha
            if self.options.alpha_search:
                h, kw, kept = sub_batches(ctx.inputs, ctx.kwargs, self.options.search_tokens)
                alpha = self._search(ctx, targets, act_max, weight_max, h, kw, [o[s] for o, s in zip(outputs, kept)])
            for t in targets:
                s = _scale(act_max[t["name"]], weight_max[t["name"]], alpha)
                _fold(ctx, t, s)
                self.log.append({"block": ctx.index, "group": t["name"], "alpha": alpha, "scale_max": float(s.max()), "scale_min": float(s.min())})
        log.info("block %d: smoothed %s (alpha %.2f)", ctx.index, ", ".join(t["name"] for t in targets), alpha)

    def _targets(self, ctx: Any) -> list[dict[str, Any]]:
        """The groups to smooth, resolved to modules, with the module a hook can observe the input at."""
        from llmc_core.layer_ops import is_norm

        adapter, block = ctx.adapter, ctx.block
        wanted = self.options.groups
        out = []
        for g in adapter.linear_groups(block):
            if wanted is not None and g.name.split(".")[0] not in wanted:
                continue
            why = g.extra.get("skip")
            layers = [adapter.get(block, n) for n in g.layers]
            prev = adapter.get(block, g.prev)
            if why is None and hasattr(layers[0], "register_forward_pre_hook"):
                where = ("input", layers[0])
            elif why is None and is_norm(prev):
                where = ("output", prev)
            else:
                why = why or f"{g.layers[0]}'s input is not observable (a fused expert's down_proj)"
            if why is not None:
                self.log.append({"block": ctx.index, "group": g.name, "skipped": why})
                log.info("block %d %s: skipped (%s)", ctx.index, g.name, why)
                continue
            out.append({"name": g.name, "prev": prev, "layers": layers, "also": [adapter.get(block, n) for n in g.also_scale], "where": where})
        return out

    def _search(self, ctx: Any, targets: list[dict[str, Any]], act_max: dict, weight_max: dict, inputs: list, kwargs: list, reference: list) -> float:
        """The grid alpha whose smoothed, quantized block is closest to the float block."""
        import copy

        import torch

        from llmc_core.blockwise import BlockContext
        from llmc_core.quant import fake_quantize_linear

        act = self.scheme.act if self.scheme is not None else None
        losses = {}
        for alpha in self.options.alpha_grid:
            trial = copy.deepcopy(ctx.block)
            tctx = BlockContext(ctx.index, trial, ctx.prefix, ctx.adapter, inputs, kwargs, ctx.device)
            mapped = [{**t, **_rebase(t, ctx.block, trial)} for t in targets]
            for t in mapped:
                _fold(tctx, t, _scale(act_max[t["name"]], weight_max[t["name"]], alpha))
            handles = []
            for lin in ctx.adapter.quant_linears(trial).values():
                fake_quantize_linear(lin, self.weight)
                if act is not None and hasattr(lin, "register_forward_pre_hook"):
                    handles.append(lin.register_forward_pre_hook(lambda m, a: (_quantize_input(a[0], act), *a[1:])))
            try:
                outs = tctx.forward()
            finally:
                for h in handles:
                    h.remove()
            losses[alpha] = sum(float(((o.float() - r.float()) ** 2).sum()) for o, r in zip(outs, reference)) / sum(r.numel() for r in reference)
            del trial, outs
        best = min(losses, key=losses.get)
        self.log.append({"block": ctx.index, "alpha_search": {str(a): v for a, v in losses.items()}, "alpha": best})
        log.info("block %d: alpha search chose %.2f (loss %.4g; alpha %.2f: %.4g)", ctx.index, best, losses[best], self.options.alpha, losses.get(self.options.alpha, float("nan")))
        return best


def _observe(ctx: Any, targets: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
    """One float forward: each target's per-channel ``max|x|`` over all tokens, and the block outputs."""
    import torch

    found: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        found[name] = torch.maximum(found[name], m) if name in found else m

    handles = []
    for t in targets:
        kind, module = t["where"]
        if kind == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, n=t["name"]: keep(n, a[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, n=t["name"]: keep(n, out[0] if isinstance(out, tuple) else out)))
    try:
        outputs = ctx.forward()
    finally:
        for h in handles:
            h.remove()
    missing = [t["name"] for t in targets if t["name"] not in found]
    if missing:
        from llmc_core.errors import LlmcError

        raise LlmcError(f"SmoothQuant: block {ctx.index}: the calibration forward never reached {', '.join(missing)}; the family's layer groups do not match this model.")
    return found, outputs


def _quantize_input(x: Any, spec: Any) -> Any:
    """``x`` quantized under the activation spec; a static spec's calibrated scale is not known
    during the search, so the input's own ``max|x|`` stands in for the observer's."""
    from llmc_core.quant.fake import fake_quantize_act, static_scale

    return fake_quantize_act(x, spec, static_scale(x.detach().abs().amax(), spec) if spec.static else None)


def _weight_max(layers: list[Any]) -> Any:
    """Per input channel, ``max|W|`` over every output row of every layer in the group."""
    import torch

    return torch.stack([lay.weight.detach().abs().float().amax(0) for lay in layers]).amax(0)


def _scale(act_max: Any, weight_max: Any, alpha: float) -> Any:
    """``max|X|^alpha / max|W|^(1-alpha)``, each clamped below at 1e-5 (the reference's rule)."""
    a = act_max.clamp(min=1e-5).pow(alpha)
    w = weight_max.to(a.device).clamp(min=1e-5).pow(1 - alpha)
    return (a / w).clamp(min=1e-5)


def _fold(ctx: Any, t: dict[str, Any], s: Any) -> None:
    from llmc_core.layer_ops import fold_scales

    fold_scales(t["prev"], t["layers"], s, ctx.adapter.norm_offset, tuple(t["also"]))


def _rebase(t: dict[str, Any], old: Any, new: Any) -> dict[str, Any]:
    """A target's modules found in ``new``, a deep copy of the block ``old``."""
    from llmc_core.layer_ops import rebase

    prev = t["prev"]
    prev = (rebase(prev[0], old, new), prev[1]) if isinstance(prev, tuple) else rebase(prev, old, new)
    return {"prev": prev, "layers": [rebase(x, old, new) for x in t["layers"]], "also": [rebase(x, old, new) for x in t["also"]]}


@hookimpl
def llmc_register_methods(register):
    register(SmoothQuant)
