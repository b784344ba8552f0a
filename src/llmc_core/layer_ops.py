"""The code behind the family tables: what a :class:`~llmc_core.adapters.LayerMapping` cannot say.

One place for every family-specific operation, so the next family reuses it:

- :class:`ExpertWeight`: one expert's ``[out, in]`` matrix of a fused 3-D expert parameter
  (transformers 5 stores MoE experts as ``experts.gate_up_proj [E, 2I, H]`` and
  ``experts.down_proj [E, H, I]``, not as ``nn.Linear`` layers); quantized like a linear layer.
- :func:`find_weights`: every quantizable matrix of a block (linear layers and expert views).
- :func:`fold_scales`: fold an input scale into the op that produces the input, exactly: a norm
  (also Gemma's ``x·(1 + w)`` norm, where the fold is ``w' = (1 + w)/s - 1``, not ``w / s``), a
  linear layer, or a row slice of a fused layer (Phi-3's ``qkv_proj`` v rows, ``gate_up_proj``'s
  up half, an expert's up rows); MoE routers reading the same input get the scale too.
- :func:`set_weight` / :func:`rebase`: swap a weight in and out during a search, for linear
  layers and expert views alike.
- :func:`expert_routing` / :func:`expert_down_input`: which tokens each expert gets, and an
  expert's down_proj input, recomputed from the experts module's own inputs.
"""

from __future__ import annotations

from typing import Any

import torch


class ExpertWeight:
    """Expert ``index`` of the 3-D parameter ``module.<param>`` (``[E, out, in]``), seen as a
    linear layer's weight holder: ``weight`` is a view, so in-place writes reach the model."""

    bias = None

    def __init__(self, module: torch.nn.Module, param: str, index: int):
        self.module, self.param, self.index = module, param, index

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param).data[self.index]

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]

    def __repr__(self) -> str:
        return f"ExpertWeight({type(self.module).__name__}.{self.param}[{self.index}], {tuple(self.weight.shape)})"


def find_weights(block: torch.nn.Module) -> dict[str, Any]:
    """``{name inside block: nn.Linear | ExpertWeight}`` in module order; a module's 3-D
    parameters give one :class:`ExpertWeight` per expert, named ``<module>.<expert>.<param>``."""
    out: dict[str, Any] = {}
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = module
            continue
        fused = [(p, t) for p, t in module.named_parameters(recurse=False) if t.dim() == 3]
        for e in range(fused[0][1].shape[0] if fused else 0):
            for p, _ in fused:
                out[f"{name}.{e}.{p}"] = ExpertWeight(module, p, e)
    return out


def weight_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight a quantized layer's full name denotes: a linear layer's ``weight``, or for a
    :func:`find_weights` expert name ``<module>.<expert>.<param>`` that expert's ``[out, in]`` slice."""
    try:
        return model.get_submodule(name).weight
    except AttributeError:
        module, index, param = name.rsplit(".", 2)
        if not index.isdigit():
            raise
        return getattr(model.get_submodule(module), param)[int(index)]


def other_matrices(block: torch.nn.Module) -> list[str]:
    """Names (inside ``block``) of 2-D parameters that are not in a linear layer, e.g. MoE routers."""
    return [f"{n}.{p}" if n else p for n, m in block.named_modules() if not isinstance(m, torch.nn.Linear) for p, t in m.named_parameters(recurse=False) if t.dim() == 2]


def _weight_rows(obj: Any) -> tuple[Any, tuple[int, int] | None]:
    return obj if isinstance(obj, tuple) else (obj, None)


def output_width(obj: Any) -> int:
    """Channels produced by a linear layer, expert view, fused part ``(layer, rows)`` or norm."""
    layer, rows = _weight_rows(obj)
    if rows is not None:
        return rows[1] - rows[0]
    return layer.weight.shape[0]


def input_width(layer: Any) -> int:
    return layer.weight.shape[-1]


def is_norm(obj: Any) -> bool:
    w = getattr(obj, "weight", None)
    return not isinstance(obj, tuple) and isinstance(w, torch.Tensor) and w.dim() == 1


@torch.no_grad()
def fold_scales(prev: Any, layers: list[Any], s: torch.Tensor, norm_offset: float = 0.0, also_scale: tuple[Any, ...] = ()) -> None:
    """Fold ``s`` in exactly: ``prev``'s output channels are divided by ``s`` and each layer's
    (and each ``also_scale`` weight's) input columns multiplied by ``s``.

    ``prev`` is a norm (``x·(norm_offset + w)``: the weight becomes ``(norm_offset + w)/s -
    norm_offset``; its bias ``/ s``), a linear layer or expert view (rows and bias ``/ s``), or a
    fused part ``(layer, (start, stop))`` (only those rows)."""
    layer, rows = _weight_rows(prev)
    s = s.to(layer.weight.device)
    w = layer.weight
    if w.dim() == 1:
        if norm_offset:
            w.copy_(((w.float() + norm_offset) / s - norm_offset).to(w.dtype))
        else:
            w.div_(s.to(w.dtype))
    else:
        target = w if rows is None else w[rows[0] : rows[1]]
        target.div_(s.view(-1, 1).to(w.dtype))
    bias = getattr(layer, "bias", None)
    if bias is not None:
        (bias if rows is None else bias[rows[0] : rows[1]]).div_(s.to(bias.dtype))
    for lay in [*layers, *also_scale]:
        lay.weight.mul_(s.view(1, -1).to(lay.weight.dtype))


def set_weight(layer: Any, w: torch.Tensor) -> None:
    """Make ``w`` the weight of ``layer`` (a linear layer: rebinding; an expert view: a copy)."""
    if isinstance(layer, ExpertWeight):
        layer.weight.copy_(w)
    else:
        layer.weight.data = w


def original_weight(layer: Any) -> torch.Tensor:
    """What :func:`set_weight` needs to put back later (an expert view's values are copied)."""
    return layer.weight.clone() if isinstance(layer, ExpertWeight) else layer.weight.data


def rebase(layer: Any, old_root: torch.nn.Module, new_root: torch.nn.Module) -> Any:
    """``layer`` (inside ``old_root``) found in ``new_root``, a copy of ``old_root``."""
    names = {m: n for n, m in old_root.named_modules()}
    if isinstance(layer, ExpertWeight):
        return ExpertWeight(new_root.get_submodule(names[layer.module]), layer.param, layer.index)
    return new_root.get_submodule(names[layer])


def expert_routing(top_k_index: torch.Tensor, n_experts: int) -> list[torch.Tensor]:
    """Per expert, the indices of the tokens routed to it (``top_k_index``: ``[tokens, k]``)."""
    return [torch.nonzero((top_k_index == e).any(-1)).flatten() for e in range(n_experts)]


def expert_down_input(experts: torch.nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """The input of expert ``e``'s down_proj for its tokens ``x``: ``act(x Wg) * (x Wu)``, as the
    fused experts module computes it."""
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up
