"""``ModelAdapter``: how a model family exposes its decoder blocks and linear layers.

Methods never walk a whole model themselves: they see one block at a time through the adapter,
which names the block's linear layers and the groups of layers that share an input (what AWQ
scales against what). Adding a family is one small subclass in a model plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class LinearGroup:
    """Linear layers that read the same input, and the op that produces that input.

    - ``name``: a short label for logs (``"qkv"``).
    - ``prev``: the module whose output feeds ``layers`` (a norm or a linear layer); an input
      scale can be folded into it.
    - ``layers``: the linear layers (names inside the block) that read that input.
    - ``inspect``: the module (name inside the block) whose output measures the error of the group,
      e.g. the attention module for q/k/v; ``""`` means the first layer of ``layers``.
    - ``inspect_kwargs``: whether ``inspect`` needs the block's keyword inputs (attention masks,
      position embeddings).
    """

    name: str
    prev: str
    layers: list[str]
    inspect: str = ""
    inspect_kwargs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class ModelAdapter:
    """The structure of one loaded model. Subclass per family; defaults fit the Llama layout."""

    blocks_path = "model.layers"
    pre_block_paths: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    post_block_paths: tuple[str, ...] = ("model.norm", "lm_head")

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

    # -- layers --------------------------------------------------------------------------------

    def quant_linears(self, block: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        """Every linear layer of ``block`` that gets quantized, by name inside the block."""
        import torch

        return {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}

    def named_quant_linears(self) -> dict[str, torch.nn.Linear]:
        """Every quantized linear layer of the model, by full name."""
        out = {}
        for i, block in enumerate(self.blocks()):
            for name, lin in self.quant_linears(block).items():
                out[f"{self.block_prefix(i)}.{name}"] = lin
        return out

    def linear_groups(self, block: torch.nn.Module) -> list[LinearGroup]:
        """Groups of layers sharing an input, in the order their inputs appear."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its linear groups")


def _has(model: Any, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
