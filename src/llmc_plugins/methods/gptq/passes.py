"""The block forwards of GPTQ's solving steps, without recomputing what is already known.

With ``true_sequential`` each input set (Llama: q/k/v, o, gate/up, down) is solved on inputs that
the already-quantized earlier sets produce, so every step needs a block forward up to its set's
input. Run naively, that is four partial forwards plus one for the block's outputs: about three
full block forwards. Most of that work repeats earlier steps:

- a submodule whose output *is* one layer's output (Llama's ``self_attn`` returns ``o_proj``'s
  output, its ``mlp`` returns ``down_proj``'s) needs no recomputation once that layer is
  quantized: its output is the quantized layer applied to the input the layer's own step
  captured. Later passes replace such a submodule by that cached output;
- the step that captures a set's input stops the forward there (nothing after it is needed).

So each projection and the attention run once per block, and the quantized block's outputs
(``quant.quant_out``) cost only the norms and residual adds: one block forward in all, plus the
Hessians. Nothing here is told the model's layout. A probe forward on one sample finds, by tensor
identity, which submodules return one of their layers' outputs unchanged (the rest of a tuple
output must be ``None``) and in which order the layers run. A cached input counts only if every
layer that ran before it was already in its final state when it was captured, and a submodule is
replaced only when every layer inside it is solved; anything else (fused MoE experts, eager
attention that also returns its weights) is computed in full, as before.

Memory: the cached inputs and outputs live where the block's inputs do, in the dtype the forward
made them (under a lower ``forward_dtype``, the inputs of layers that read a matmul's output,
o_proj's and down_proj's, and every known output are in that dtype: half of float32's): at
most one layer input (``tokens × in``, down_proj's the widest) and one output per replaced
submodule (``tokens × hidden`` each) besides the block's inputs. A kept input turns into its
layer's output one part at a time and its pages go back to the system before the next pass
(down_proj's input is ``tokens × intermediate``, its output ``tokens × hidden``); the last pass
lets each known output go once it is used, so the block's outputs take their place.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from llmc_core.blockwise import BlockContext, first_tensor, join_parts, split_call, sub_batches
from llmc_core.memory import release_heap
from llmc_plugins.methods.gptq.solver import Hessian


class _Done(Exception):
    """Ends a forward pass once every layer the pass collects has seen its input."""


class BlockPasses:
    """The forwards of one block's solving steps: Hessian hooks, early stops and the submodule
    outputs already known (see the module docstring)."""

    def __init__(self, ctx: BlockContext, linears: dict[str, torch.nn.Module], dtype: torch.dtype | None = None):
        self.ctx = ctx
        self.linears = linears
        self.dtype = dtype  # autocast's (GPTQ's forward_dtype) where lower than the block's; None: as it is
        self.order, self.parents = _probe(ctx, linears, self.compute)  # run order; layer -> (submodule, output shape)
        self.solved: set[str] = set()
        self._inputs: dict[str, list[torch.Tensor]] = {}  # layer -> its input, one tensor per call
        self._outputs: dict[str, list[Any]] = {}  # submodule name -> its output, one per call

    def run(self, sets: list[list[str]], to_end: bool = False, keep: bool = True) -> tuple[dict[str, Hessian], list[torch.Tensor]]:
        """One pass over the calibration batches that accumulates the input Hessian of each set
        of layers sharing an input (keyed by the set's first layer). Unless ``to_end``, a call
        stops once every set has seen its input; with ``to_end`` the block's outputs are returned
        too (one tensor per batch). ``keep``: a later pass will run, so inputs that can stand in
        for a submodule are kept for it."""
        firsts = {s[0]: s for s in sets}
        hessians = {n: Hessian.zeros(self.linears[n].in_features, self.linears[n].weight.device) for n in firsts}
        kept: dict[str, list[torch.Tensor]] = {n: [] for n, s in firsts.items() if keep and self._worth_keeping(s)}
        seen: set[str] = set()

        def make(name: str):
            def pre(module: Any, args: tuple) -> None:
                hessians[name].add(args[0])
                if name in kept:
                    kept[name].append(args[0])
                seen.add(name)
                if not to_end and len(seen) == len(firsts):
                    raise _Done

            return pre

        handles = [self.linears[n].register_forward_pre_hook(make(n)) for n in firsts]
        outputs = []
        try:
            with torch.no_grad(), self.compute(), self._replaced(last=not keep) as slot:

                def calls(h: torch.Tensor, kw: dict[str, Any]) -> Iterator[torch.Tensor]:
                    for args, part_kw in split_call((h,), kw):
                        seen.clear()
                        try:
                            yield first_tensor(self.ctx.block(*args, **part_kw))
                        except _Done:
                            pass
                        slot[0] += 1

                for h, kw in zip(self.ctx.inputs, self.ctx.kwargs):
                    if to_end:
                        outputs.append(join_parts(h.shape[0], calls(h, kw)))
                    else:
                        for _ in calls(h, kw):
                            pass
        finally:
            for handle in handles:
                handle.remove()
        self._inputs.update(kept)
        release_heap()  # this pass's activations: the next pass or the solver reuses the pages otherwise kept
        return hessians, outputs

    def mark_solved(self, layers: list[str]) -> None:
        """The set ``layers`` (one shared input) now holds its final, quantized weights: a
        submodule that returns one of their outputs becomes that layer applied to the input this
        set's pass kept."""
        self.solved.update(layers)
        x = self._inputs.pop(layers[0], None)
        if x is None:
            return
        known = [n for n in layers if n in self.parents]
        outs: dict[str, list[torch.Tensor]] = {n: [] for n in known}
        with torch.no_grad(), self.compute():
            for i in range(len(x)):  # each input part is dropped once its outputs exist: one part's overlap, not the whole input's
                for name in known:
                    outs[name].append(self.linears[name](x[i]))
                x[i] = None
        del x
        for name in known:
            parent, shape = self.parents[name]
            self._outputs[parent] = outs[name] if shape is None else [shape[0]((o, *[None] * (shape[1] - 1))) for o in outs[name]]
        release_heap()  # the input's pages (down_proj's: tokens x 1536), before the next pass allocates its own

    def compute(self) -> contextlib.AbstractContextManager:
        """The precision of the block's forwards: autocast to ``dtype`` (matmuls, attention) with
        the residual stream and norms in the block's own dtype, or the block as it is."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.dtype)

    def _worth_keeping(self, layers: list[str]) -> bool:
        """Keep a set's input only if it can stand in for a submodule later: the submodule returns
        one of the set's outputs, and every other layer that runs before the set is already final
        (so the input is the quantized block's)."""
        if not any(n in self.parents for n in layers):
            return False
        first = min(self.order.index(n) for n in layers if n in self.order)
        return all(n in self.solved or n in layers for n in self.order[:first])

    @contextlib.contextmanager
    def _replaced(self, last: bool) -> Iterator[list[int]]:
        """Swap in the known outputs of submodules whose layers are all solved, for one pass;
        yields a one-item list that the pass keeps at the index of its current call. ``last``: no
        pass follows, so each known output is let go once used (the block's outputs grow as they shrink)."""
        slot = [0]
        swapped = []
        for name, outs in self._outputs.items():
            if not all(n in self.solved for n in self.linears if n.startswith(f"{name}.")):
                continue
            module = self.ctx.block.get_submodule(name)
            swapped.append((module, module.__dict__.get("forward")))  # e.g. an accelerate hook's wrapper
            module.forward = functools.partial(_known_output, outs, slot, last)
        try:
            yield slot
        finally:
            for module, own in swapped:
                if own is None:
                    del module.forward
                else:
                    module.forward = own


def _known_output(outs: list[Any], slot: list[int], last: bool, *args: Any, **kwargs: Any) -> Any:
    """A replaced submodule's forward: its known output for the pass's current call."""
    out = outs[slot[0]]
    if last:
        outs[slot[0]] = None
    return out


def _probe(ctx: BlockContext, linears: dict[str, Any], compute: Any = contextlib.nullcontext) -> tuple[list[str], dict[str, tuple[str, Any]]]:
    """One forward of the block on its first calibration sample, watched: the order in which the
    linear layers run, and for each layer the outermost submodule (short of the block) whose
    output is that layer's output tensor itself, with that output's shape (a tuple's other items
    must be ``None``): ``{layer: (submodule, (tuple type, length) or None)}``. A layer that runs
    more than once per block call gets no submodule."""
    modules = {n: m for n, m in linears.items() if isinstance(m, torch.nn.Module)}  # not fused expert views
    where = {id(m): n for n, m in modules.items()}
    order: list[str] = []
    calls: dict[str, int] = {}
    produced: list[tuple[str, torch.Tensor]] = []  # held until the probe ends: no id is reused
    parents: dict[str, tuple[str, Any]] = {}

    def linear_hook(module: Any, args: tuple, out: Any) -> None:
        name = where[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if calls[name] == 1:
            order.append(name)
        produced.append((name, out))

    def parent_hook(name: str):
        def hook(module: Any, args: tuple, out: Any) -> None:
            tensor = first_tensor(out)
            is_tuple = isinstance(out, (tuple, list))
            if (is_tuple and type(out) not in (tuple, list)) or (is_tuple and any(r is not None for r in out[1:])):
                return  # a named tuple cannot be rebuilt from its items; other outputs are not known
            for layer, t in produced:
                if t is tensor and layer.startswith(f"{name}."):
                    # outer submodules finish later: the last one to claim a layer is the outermost
                    parents[layer] = (name, (type(out), len(out)) if is_tuple else None)

        return hook

    handles = [m.register_forward_hook(linear_hook) for m in modules.values()]
    ancestors = {n.rsplit(".", i)[0] for n in modules for i in range(1, n.count(".") + 1)}
    handles += [ctx.block.get_submodule(a).register_forward_hook(parent_hook(a)) for a in ancestors]
    try:
        h, kw, _ = sub_batches(ctx.inputs, ctx.kwargs, 1)
        with torch.no_grad(), compute():
            ctx.block(h[0], **kw[0])
    finally:
        for handle in handles:
            handle.remove()
    return order, {layer: found for layer, found in parents.items() if calls[layer] == 1}
