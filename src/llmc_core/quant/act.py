"""Activation and KV-cache quantizers: installed on a model from ``fake_quant`` on, and the observers
that calibrate their static scales in the block pass.

- Input activations: a forward pre-hook on each quantized linear layer fake-quantizes its input
  under ``scheme.act`` (:func:`llmc_core.quant.fake.fake_quantize_act`), with the layer's
  calibrated scale when the spec is static.
- KV cache: keys (after RoPE) and values are fake-quantized as they enter the attention, the
  point where an engine writes them to its cache. The attention module's cache argument (``cache``
  in transformers 5, ``past_key_values`` before) is wrapped by :class:`_KvQuantCache`, whose
  ``update`` quantizes both and hands them to the real cache when there is one; without a cache
  (perplexity windows) it quantizes and returns them. An attention module is a module with
  ``k_proj`` and ``v_proj`` children; fused-QKV families have none and are refused at validation.

Static scales: :func:`observe` runs a block's forward with hooks that record ``max |x|`` of every
quantized layer's input (and of K and V); :func:`llmc_core.quant.fake.static_scale` turns the
running maximum into the scale.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from llmc_core.quant.fake import fake_quantize_act, static_scale

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def attention_modules(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Every submodule of ``module`` with ``k_proj`` and ``v_proj`` children, by full name."""
    out = {}
    for name, sub in module.named_modules():
        if isinstance(getattr(sub, "k_proj", None), nn.Module) and isinstance(getattr(sub, "v_proj", None), nn.Module):
            out[f"{prefix}.{name}" if prefix and name else prefix or name] = sub
    return out


class _KvQuantCache:
    """Stands in for an attention module's cache argument: quantizes K and V, then delegates."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], inner: Any):
        self._fn, self._inner = fn, inner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        key_states, value_states = self._fn(key_states, value_states)
        if self._inner is None:
            return key_states, value_states
        return self._inner.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else the attention reads of its cache
        if self._inner is None:
            raise AttributeError(name)
        return getattr(self._inner, name)


def _cache_kwarg(attn: nn.Module) -> str:
    params = inspect.signature(attn.forward).parameters
    for name in _CACHE_KWARGS:
        if name in params:
            return name
    raise ValueError(f"{type(attn).__name__}.forward takes no cache argument ({', '.join(_CACHE_KWARGS)}); llmc cannot quantize its KV cache")


def _kv_hook(attn: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> Any:
    key = _cache_kwarg(attn)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs[key] = _KvQuantCache(fn, kwargs.get(key))
        return args, kwargs

    return attn.register_forward_pre_hook(pre_hook, with_kwargs=True)


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Quantizers:
    """The activation and KV quantizers of one model; :meth:`remove` takes them off again."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def install(model: nn.Module, scheme: Any, layers: Iterable[str], act_scales: Mapping[str, torch.Tensor], kv_scales: Mapping[str, Mapping[str, torch.Tensor]], attention: Mapping[str, nn.Module] | None = None) -> Quantizers:
    """Put ``scheme``'s activation quantizers on ``layers`` (full names of quantized linears) and
    its KV quantizers on ``attention`` (full name -> module; default: every attention module of
    ``model``). Static specs take their scales from ``act_scales`` / ``kv_scales``; a missing one
    is an error (fail closed: never an unquantized layer in a quantized model)."""
    q = Quantizers()
    try:
        if scheme.act is not None:
            spec = scheme.act
            for name in layers:
                scale = act_scales.get(name) if spec.static else None
                if spec.static and scale is None:
                    raise ValueError(f"{name}: static activation scale missing (the block pass did not observe this layer)")
                q.handles.append(model.get_submodule(name).register_forward_pre_hook(_act_hook(spec, scale)))
        if scheme.kv is not None:
            spec = scheme.kv
            for name, attn in (attention if attention is not None else attention_modules(model)).items():
                scales = kv_scales.get(name) if spec.static else None
                if spec.static and scales is None:
                    raise ValueError(f"{name}: static KV cache scales missing (the block pass did not observe this attention)")
                q.handles.append(_kv_hook(attn, _kv_fn(spec, scales)))
    except BaseException:
        q.remove()
        raise
    return q


def _act_hook(spec: Any, scale: torch.Tensor | None) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        s = None if scale is None else scale.to(x.device)
        return (fake_quantize_act(x, spec, s), *args[1:])

    hook.llmc_quantizer = spec  # type: ignore[attr-defined]  # marks llmc's activation quantizer (tests, debugging)
    return hook


def _kv_fn(spec: Any, scales: Mapping[str, torch.Tensor] | None) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def fn(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if scales is None:  # per token: K and V are [batch, heads, tokens, head_dim]; a token's scale spans its heads
            return _per_token(k, spec), _per_token(v, spec)
        return fake_quantize_act(k, spec, scales["k"].to(k.device)), fake_quantize_act(v, spec, scales["v"].to(v.device))

    return fn


def _per_token(t: torch.Tensor, spec: Any) -> torch.Tensor:
    b, h, n, d = t.shape
    tokens = t.transpose(1, 2).reshape(b, n, h * d)
    return fake_quantize_act(tokens, spec).reshape(b, n, h, d).transpose(1, 2)


class Observer:
    """What each quantized layer's input and each attention's K and V look like over the
    calibration data, as the spec's ``calib_algo`` says: ``minmax`` keeps the running ``max |x|``
    (``[1]``); ``mse`` keeps, over every observed call, the sum of each call's MSE-best clipping
    threshold weighted by its tokens and the token count (``[2]``): their mean stands in for
    ``max |x|``. :meth:`act_scales` / :meth:`kv_scales` turn them into static scales."""

    def __init__(self, scheme: Any) -> None:
        self.scheme = scheme
        self.act_amax: dict[str, torch.Tensor] = {}
        self.kv_amax: dict[str, dict[str, torch.Tensor]] = {}

    def _keep(self, table: dict[str, torch.Tensor], key: str, x: torch.Tensor, spec: Any) -> None:
        if spec.calib_algo == "mse":
            from llmc_core.quant.fake import act_mse_threshold

            n = x[..., 0].numel()
            m = torch.cat([act_mse_threshold(x, spec).cpu() * n, torch.tensor([float(n)])])
            table[key] = table[key] + m if key in table else m
            return
        m = x.detach().abs().amax().float().cpu().reshape(1)
        table[key] = torch.maximum(table[key], m) if key in table else m

    @staticmethod
    def _threshold(kept: torch.Tensor) -> torch.Tensor:
        """``max |x|`` (minmax) or the token-weighted mean threshold (mse), ``[1]``."""
        return kept[:1] / kept[1:] if kept.numel() == 2 else kept

    @contextmanager
    def watching(self, block: nn.Module, prefix: str, layers: Mapping[str, nn.Module]) -> Iterator[None]:
        """Record while ``block`` runs forwards: ``layers`` (names relative to ``prefix``)."""
        handles = []
        if self.scheme.act is not None and self.scheme.act.static:
            for name, layer in layers.items():
                full = f"{prefix}.{name}"
                handles.append(layer.register_forward_pre_hook(lambda m, args, full=full: self._keep(self.act_amax, full, args[0], self.scheme.act)))
        if self.scheme.kv is not None and self.scheme.kv.static:
            for full, attn in attention_modules(block, prefix).items():
                table = self.kv_amax.setdefault(full, {})

                def fn(k: torch.Tensor, v: torch.Tensor, table: dict[str, torch.Tensor] = table) -> tuple[torch.Tensor, torch.Tensor]:
                    self._keep(table, "k", k, self.scheme.kv)
                    self._keep(table, "v", v, self.scheme.kv)
                    return k, v

                handles.append(_kv_hook(attn, fn))
        with _hooks(handles):
            yield

    def block_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """What was observed in block ``prefix`` (for the block checkpoint): flat name -> amax."""
        out = {f"act:{n}": a for n, a in self.act_amax.items() if n.startswith(f"{prefix}.")}
        out.update({f"kv:{kv}:{n}": a for n, t in self.kv_amax.items() if n.startswith(f"{prefix}.") for kv, a in t.items()})
        return out

    def restore_block(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take back what :meth:`block_state` returned."""
        for key, a in state.items():
            kind, _, rest = key.partition(":")
            if kind == "act":
                self.act_amax[rest] = a.float().reshape(-1)
            elif kind == "kv":
                kv, _, name = rest.partition(":")
                self.kv_amax.setdefault(name, {})[kv] = a.float().reshape(-1)
            else:
                raise ValueError(f"unknown observed entry {key!r}")

    def act_scales(self) -> dict[str, torch.Tensor]:
        return {n: static_scale(self._threshold(a), self.scheme.act) for n, a in self.act_amax.items()}

    def kv_scales(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: {kv: static_scale(self._threshold(a), self.scheme.kv) for kv, a in t.items()} for n, t in self.kv_amax.items()}
