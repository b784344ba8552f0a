"""``ModelAdapter``: how a model family exposes its decoder blocks and the weights to quantize.

Methods never walk a whole model themselves: they see one block at a time through the adapter,
which names the block's quantized weights and the groups of layers that share an input (what AWQ
scales against what). A family is *data*: a table of :class:`LayerMapping` entries
(``{prev, layers, inspect}`` name patterns, as llm-compressor's ``AWQMapping``) resolved against
each block, plus a few class attributes (fused row splits, weights kept in float, the norm's
weight offset). What a table cannot say -- Gemma's ``1 + weight`` norm, slices of fused layers,
per-expert views of fused 3-D expert tensors -- is code in :mod:`llmc_core.layer_ops`, once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch


@dataclass
class LinearGroup:
    """Linear layers that read the same input, and the op that produces that input (resolved).

    - ``name``: a short label for logs (``"qkv"``, ``"down.3"``).
    - ``prev``: the module whose output feeds ``layers`` (a norm or a linear layer, or a fused
      layer's part: ``mlp.gate_up_proj:up``); an input scale can be folded into it.
    - ``layers``: the quantized weights (names inside the block) that read that input.
    - ``inspect``: the module (name inside the block) whose output measures the error of the group,
      e.g. the attention module for q/k/v; ``""`` means the first layer of ``layers``.
    - ``inspect_kwargs``: whether ``inspect`` needs the block's keyword inputs.
    - ``also_scale``: float weights that read the same input (MoE routers): scaled with ``layers``
      so the fold stays exact, never quantized.
    - ``extra``: ``{"skip": reason}`` when a shape rule says the group cannot be scaled.
    """

    name: str
    prev: str
    layers: list[str]
    inspect: str = ""
    inspect_kwargs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    also_scale: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LayerMapping:
    """One row of a family's table; names are patterns inside a block.

    ``*`` matches one name component (an expert index). When ``prev`` has a ``*``, the row gives
    one group per match, the same index bound in ``layers`` (each expert's down_proj against its
    own up rows); otherwise ``layers`` patterns collect every match. ``prev`` may name a part of a
    fused layer (``self_attn.qkv_proj:v``; parts are in the adapter's ``fused_parts``).

    ``same_width``: a data-level shape rule; when ``prev``'s output width differs from the layers'
    input width the group is kept but marked skipped with this reason (grouped-query attention).
    ``optional``: the row may match nothing in a block (e.g. a shared expert some blocks lack).
    """

    name: str
    prev: str
    layers: tuple[str, ...]
    inspect: str = ""
    inspect_kwargs: bool = False
    also_scale: tuple[str, ...] = ()
    same_width: str = ""
    optional: bool = False


GQA = "grouped-query attention"


class ModelAdapter:
    """The structure of one loaded model. Families set the class attributes; defaults fit Llama.

    - ``mappings``: the family's :class:`LayerMapping` table (empty: no method that needs layer
      groups can run, RTN still can).
    - ``fused_parts``: ``{layer pattern: ("part:weight", ...)}``: a fused layer's rows split in
      proportion to the weights, each a config attribute name or a number
      (``"q:num_attention_heads"``).
    - ``keep_float``: ``{pattern: reason}``: weights inside blocks that are never quantized.
    - ``kinds``: ``(name prefix, kind)`` pairs, first match wins: how weights are counted in logs.
    - ``norm_offset``: the family's norms compute ``x·(norm_offset + weight)`` (Gemma: 1).
    """

    blocks_path = "model.layers"
    pre_block_paths: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    post_block_paths: tuple[str, ...] = ("model.norm", "lm_head")
    mappings: ClassVar[tuple[LayerMapping, ...]] = ()
    fused_parts: ClassVar[dict[str, tuple[str, ...]]] = {}
    keep_float: ClassVar[dict[str, str]] = {}
    kinds: ClassVar[tuple[tuple[str, str], ...]] = (("mlp.experts.", "experts"), ("mlp.shared_expert.", "experts"), ("self_attn.", "attention"), ("mlp.", "MLP"))
    norm_offset: ClassVar[float] = 0.0

    def __init__(self, model: torch.nn.Module):
        self.model = model

    # -- blocks --------------------------------------------------------------------------------

    def blocks(self) -> list[torch.nn.Module]:
        return list(self.model.get_submodule(self.blocks_path))

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def pre_block_modules(self) -> list[torch.nn.Module]:
        return [self.model.get_submodule(p) for p in self.pre_block_paths if _has(self.model, p)]

    def post_block_modules(self) -> list[torch.nn.Module]:
        return [self.model.get_submodule(p) for p in self.post_block_paths if _has(self.model, p)]

    def logits(self, head_output: torch.Tensor) -> torch.Tensor:
        """The model's logits from ``lm_head``'s output (Gemma soft-caps them)."""
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            import torch

            return torch.tanh(head_output / cap) * cap
        return head_output

    # -- weights -------------------------------------------------------------------------------

    def all_weights(self, block: torch.nn.Module) -> dict[str, Any]:
        """Every matrix of ``block`` llmc could quantize: ``nn.Linear`` layers and one
        :class:`~llmc_core.layer_ops.ExpertWeight` per expert of fused 3-D expert tensors."""
        from llmc_core.layer_ops import find_weights

        return find_weights(block)

    def quant_linears(self, block: torch.nn.Module) -> dict[str, Any]:
        """Every weight of ``block`` that gets quantized, by name inside the block: ``nn.Linear``
        layers and per-expert views (``mlp.experts.3.down_proj``), without ``keep_float``."""
        return {n: w for n, w in self.all_weights(block).items() if self.float_reason(n) is None}

    def float_reason(self, name: str) -> str | None:
        """Why the weight ``name`` (inside a block) stays float, or None when it is quantized."""
        return next((why for pat, why in self.keep_float.items() if _match(pat, name) is not None), None)

    def kind(self, name: str) -> str:
        return next((k for prefix, k in self.kinds if name.startswith(prefix)), "other")

    def named_quant_linears(self) -> dict[str, Any]:
        """Every quantized weight of the model, by full name."""
        out = {}
        for i, block in enumerate(self.blocks()):
            for name, lin in self.quant_linears(block).items():
                out[f"{self.block_prefix(i)}.{name}"] = lin
        return out

    def inventory(self) -> tuple[dict[str, int], dict[str, str]]:
        """What a method will quantize, before any work: ``({kind: number of weights},
        {full name: why it stays float})`` over the whole model (routers, embeddings, lm_head...)."""
        from llmc_core.layer_ops import other_matrices

        counts: dict[str, int] = {}
        skipped: dict[str, str] = {}
        in_blocks = set()
        for i, block in enumerate(self.blocks()):
            prefix = self.block_prefix(i)
            for name in self.all_weights(block):
                why = self.float_reason(name)
                if why is None:
                    counts[self.kind(name)] = counts.get(self.kind(name), 0) + 1
                else:
                    skipped[f"{prefix}.{name}"] = why
            for param in other_matrices(block):
                module = param.rsplit(".", 1)[0] if "." in param else ""
                skipped[f"{prefix}.{param}"] = self.float_reason(module) or self.float_reason(param) or "not a linear layer or fused expert tensor"
            in_blocks.update(f"{prefix}.{n}" for n, _ in block.named_parameters())
        for name, p in self.model.named_parameters():
            if p.dim() >= 2 and name not in in_blocks and not name.startswith(f"{self.blocks_path}."):
                skipped[name] = "outside the decoder blocks (embeddings and lm_head stay float)"
        return counts, skipped

    def get(self, block: torch.nn.Module, name: str) -> Any:
        """A module, expert view or fused part (``name:part``) of ``block`` by name.

        Fused parts come back as ``(weight, (start, stop))``: the rows of that part."""
        base, _, part = name.partition(":")
        weights = self.all_weights(block)
        obj = weights[base] if base in weights else block.get_submodule(base)
        if not part:
            return obj
        return obj, self.part_rows(base, part, obj.weight.shape[0])

    def part_rows(self, layer: str, part: str, rows: int) -> tuple[int, int]:
        """Rows ``(start, stop)`` of ``part`` in the fused layer ``layer`` with ``rows`` outputs."""
        spec = next((parts for pat, parts in self.fused_parts.items() if _match(pat, layer) is not None), None)
        if spec is None:
            raise KeyError(f"{layer} has no fused parts in {type(self).__name__}.fused_parts")
        cfg = getattr(self.model, "config", None)
        weights = [(p.split(":")[0], _number(p.split(":")[1], cfg)) for p in spec]
        total, start = sum(w for _, w in weights), 0
        for p, w in weights:
            stop = start + rows * w // total
            if p == part:
                return start, stop
            start = stop
        raise KeyError(f"{layer} has no part '{part}' (parts: {', '.join(p for p, _ in weights)})")

    # -- groups --------------------------------------------------------------------------------

    def linear_groups(self, block: torch.nn.Module) -> list[LinearGroup]:
        """Groups of layers sharing an input, in the order their inputs appear: the family's
        ``mappings`` resolved against ``block``."""
        if not self.mappings:
            raise NotImplementedError(f"{type(self).__name__} has no layer mappings")
        names = list(dict.fromkeys([*self.all_weights(block), *(n for n, _ in block.named_modules() if n)]))
        groups = []
        for row in self.mappings:
            found = self._resolve(row, block, names)
            if not found and not row.optional:
                raise ValueError(f"{type(self).__name__}: mapping '{row.name}' ({row.prev} -> {', '.join(row.layers)}) matches nothing in block {type(block).__name__}")
            groups += found
        return groups

    def check_linear_groups(self, method: str) -> None:
        """Raise :class:`~llmc_core.errors.LlmcError` (one line) unless every block's linear groups
        resolve: what a method that scales a group against the op before it (AWQ, SmoothQuant) needs."""
        from llmc_core.errors import LlmcError

        try:
            for block in self.blocks():
                self.linear_groups(block)
        except NotImplementedError as exc:
            raise LlmcError(f"quant.method: {method} needs the model's linear groups, and {exc}. Use a supported model.type (llmc plugins lists them) or quant.method: RTN.") from exc
        except (KeyError, ValueError) as exc:
            raise LlmcError(f"quant.method: {method} cannot resolve the model family's layer mappings: {exc}. The model.type does not fit this checkpoint; use model.type: auto, or quant.method: RTN.") from exc

    def _resolve(self, row: LayerMapping, block: Any, names: list[str]) -> list[LinearGroup]:
        prev_base, sep, part = row.prev.partition(":")
        bindings = list(dict.fromkeys(m for n in names if (m := _match(prev_base, n)) is not None)) if "*" in prev_base else [()]
        out = []
        for bound in bindings:
            prev = _bind(prev_base, bound) + sep + part
            layers = [n for pat in row.layers for n in names if _match(_bind(pat, bound), n) is not None]
            if not layers or not _exists(prev_base, bound, names):
                continue
            also = [n for pat in row.also_scale for n in names if _match(_bind(pat, bound), n) is not None]
            label = row.name + "".join(f".{b}" for b in bound)
            group = LinearGroup(label, prev, list(dict.fromkeys(layers)), _bind(row.inspect, bound), row.inspect_kwargs, also_scale=also)
            if row.same_width:
                from llmc_core import layer_ops

                width = layer_ops.output_width(self.get(block, prev))
                reads = layer_ops.input_width(self.get(block, layers[0]))
                if width != reads:
                    group.extra["skip"] = f"{prev} has {width} outputs but {layers[0]} has {reads} inputs ({row.same_width})"
            out.append(group)
        return out


def _match(pattern: str, name: str) -> tuple[str, ...] | None:
    """The values each ``*`` (one name component) took when ``name`` matches ``pattern``
    (``()`` when it has none), else None."""
    m = re.match("^" + re.escape(pattern).replace(r"\*", "([^.]+)") + "$", name)
    return None if m is None else tuple(m.groups())


def _bind(pattern: str, values: tuple[str, ...]) -> str:
    for v in values:
        pattern = pattern.replace("*", v, 1)
    return pattern


def _exists(pattern: str, bound: tuple[str, ...], names: list[str]) -> bool:
    return _bind(pattern, bound) in names


def _number(value: str, cfg: Any) -> int:
    return int(value) if value.isdigit() else int(getattr(cfg, value))


def _has(model: Any, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
