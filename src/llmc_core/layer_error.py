"""Per-layer quantization error: where the damage is, for the run report.

For every linear layer a method quantizes, the run records

- ``weight_rel_mse``: ``||W - Q||² / ||W||²`` (always);
- ``output_rel_mse``: ``||x (W - Q)ᵀ||² / ||x Wᵀ||²`` on a few calibration tokens ``x`` that reach
  the layer (``None`` when the method used no calibration data, as RTN does).

``W`` is the weight the method hands to quantization (after its transform), ``Q`` what it left.
Collecting costs almost nothing: the layer inputs are sampled by forward pre-hooks during the
block-wise runner's own output pass (``tokens`` evenly spaced rows of the first batch, kept on CPU
until the layer is quantized), and the weights are compared around ``quantize_block`` while the
block is on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from llmc_core.blockwise import BlockContext


class LayerErrors:
    """Collects one row per quantized layer: ``{layer, block, name, weight_rel_mse, output_rel_mse}``."""

    def __init__(self, tokens: int = 64):
        self.tokens = tokens
        self.rows: list[dict[str, Any]] = []
        self.inputs: dict[str, torch.Tensor] = {}  # full layer name -> [tokens, in_features] float32, CPU
        self._pending: dict[str, tuple[int, str, float, torch.Tensor, torch.Tensor]] = {}
        self._hooks: list[Any] = []
        self._last: tuple[Any, Any] | None = None  # (input, sample): q/k/v read the same tensor

    # -- inputs --------------------------------------------------------------------------------

    def listen(self, ctx: BlockContext) -> None:
        """Sample the inputs of ``ctx.block``'s linear layers during the block's next forward pass."""
        self._listen(ctx.adapter, ctx.block, ctx.prefix)

    def listen_model(self, adapter: Any) -> None:
        """Sample the inputs of every quantized layer during the next forward pass of the whole
        model (the pretrain evaluation, for methods that see no calibration data)."""
        for i, block in enumerate(adapter.blocks()):
            self._listen(adapter, block, adapter.block_prefix(i))

    def _listen(self, adapter: Any, block: Any, prefix: str) -> None:
        for name, linear in adapter.quant_linears(block).items():
            if not hasattr(linear, "register_forward_pre_hook"):
                continue  # a fused expert's view: its inputs are not observable (output error not measured)
            full = f"{prefix}.{name}"

            def hook(module: Any, args: tuple, _full: str = full) -> None:
                if _full not in self.inputs and args:
                    if self._last is None or self._last[0] is not args[0]:
                        self._last = (args[0], self._sample(args[0]))
                    self.inputs[_full] = self._last[1]

            self._hooks.append(linear.register_forward_pre_hook(hook))

    def stop(self, ctx: BlockContext | None = None) -> None:
        """Remove the hooks of :meth:`listen`; measure ``ctx``'s layers that were quantized before
        their inputs were seen."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._last = None
        for full in [f for f in self._pending if ctx is not None and f.startswith(f"{ctx.prefix}.")]:
            self._flush(full)

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        rows = x.detach().reshape(-1, x.shape[-1])
        idx = torch.linspace(0, rows.shape[0] - 1, min(self.tokens, rows.shape[0]), device=rows.device).long()
        return rows[idx].float().cpu()

    # -- weights -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def quantizing(self, ctx: BlockContext, inputs_follow: bool = False) -> Iterator[None]:
        """Wrap a method's ``quantize_block(ctx)``: compare each layer's weight before and after.

        ``inputs_follow``: the block's inputs are sampled after quantization (``quant_out``: the
        runner's output pass comes next), so the measurement waits for :meth:`stop`.
        """
        import torch

        linears = ctx.adapter.quant_linears(ctx.block)
        before = {name: lin.weight.detach().clone() for name, lin in linears.items()}  # model dtype: one block's copy
        yield
        with torch.no_grad():
            for name, lin in linears.items():
                w = before.pop(name).float()
                delta = w - lin.weight.detach().float()
                if not delta.any():
                    continue  # the method left this layer alone
                weight_err = _ratio(delta.pow(2).sum(), w.pow(2).sum())
                full = f"{ctx.prefix}.{name}"
                self._pending[full] = (ctx.index, name, weight_err, w, delta)
                if full in self.inputs or not inputs_follow:
                    self._flush(full)

    def _flush(self, full: str) -> None:
        import torch

        index, name, weight_err, w, delta = self._pending.pop(full)
        out_err = None
        x = self.inputs.pop(full, None)
        if x is not None:
            with torch.no_grad():
                x = x.to(w.device)
                out_err = _ratio((x @ delta.T).pow(2).sum(), (x @ w.T).pow(2).sum())
        self.rows.append({"layer": full, "block": index, "name": name, "weight_rel_mse": weight_err, "output_rel_mse": out_err})

    def finish(self) -> list[dict[str, Any]]:
        """Measure what is left (layers whose inputs never came) and return the rows in model order."""
        for full in list(self._pending):
            self._flush(full)
        self.inputs.clear()
        self.rows.sort(key=lambda r: r["block"])  # stable: layers keep the adapter's order
        return self.rows

    # -- checkpoints ---------------------------------------------------------------------------

    def block_state(self, prefix: str) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """The sampled inputs and finished rows of one block (what a checkpoint keeps)."""
        inputs = {k: v for k, v in self.inputs.items() if k.startswith(f"{prefix}.")}
        rows = [r for r in self.rows if r["layer"].startswith(f"{prefix}.")]
        return inputs, rows

    def restore_block(self, inputs: dict[str, torch.Tensor], rows: list[dict[str, Any]]) -> None:
        self.inputs.update(inputs)
        self.rows.extend(rows)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    den_f = float(den)
    return float(num) / den_f if den_f > 0 else 0.0
