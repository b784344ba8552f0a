"""An example llmc plugin: one weight-only method and one calibration dataset.

Installed with ``pip install -e .``, the ``[project.entry-points.llmc]`` table of ``pyproject.toml``
points llmc at this module; llmc imports it the first time it needs a registry and calls the two
``@hookimpl`` functions at the bottom. Nothing in llmc names this package.

Select the parts by name in a config::

    quant:
      method: absmax_mse
      weight: {bit: 4, symmetric: true, granularity: per_group, group_size: 64}
      special: {grid: 20, max_shrink: 0.5}
    calib:
      name: lines
      path: my_prompts.txt
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmc_core import LlmcError, hookimpl
from llmc_core.api import Dataset, Method

# torch is imported inside the functions that use it: `llmc plugins` and `llmc validate` import
# every plugin module and must stay fast.


class AbsmaxMseConfig(BaseModel):
    """The ``quant.special`` section of ``absmax_mse``."""

    # extra="forbid": a misspelled key is a one-line config error, not a silently ignored option.
    model_config = ConfigDict(extra="forbid")

    grid: int = Field(default=20, ge=1, le=200, description="clip ratios tried per group")
    max_shrink: float = Field(default=0.5, ge=0.0, lt=1.0, description="smallest ratio tried is 1 - max_shrink")
    norm: float = Field(default=2.0, gt=0.0, description="error exponent: 2 is the squared error")


class AbsmaxMse(Method):
    """Symmetric round-to-nearest with a per-group clip ratio chosen by a small error search.

    Paper: none of its own; it is the weight-clipping search of AWQ (Lin et al., MLSys 2024,
    https://arxiv.org/abs/2306.00978) and GPTQ's ``mse`` option, without activations.

    What it does: for every linear layer inside the decoder blocks and every group of
    ``quant.weight.group_size`` weights, it tries the absmax scales ``absmax * r / qmax`` for
    ``grid`` ratios ``r`` evenly spaced from 1 down to ``1 - max_shrink``, and keeps the one whose
    quantize-dequantize error ``sum |w - q(w)|^norm`` is smallest. Ratio 1 is plain symmetric RTN,
    so per group the error is never larger than RTN's.
    What it does not do: use calibration data or activations (it is data-free), transform the
    float model (``transformed`` equals ``pretrain``), touch embeddings or ``lm_head``, or support
    asymmetric quantization (it refuses ``quant.weight.symmetric: false``).

    Example::

        quant:
          method: absmax_mse
          weight: {bit: 4, symmetric: true, granularity: per_group, group_size: 64}
          special: {grid: 20, max_shrink: 0.5, norm: 2.0}

    ``quant.special`` fields:

    - ``grid`` (default 20, 1-200): how many clip ratios are tried per group.
    - ``max_shrink`` (default 0.5, 0 to <1): the smallest ratio tried is ``1 - max_shrink``.
    - ``norm`` (default 2.0, > 0): the error exponent; 2 minimises the squared error.
    """

    name = "absmax_mse"
    Config = AbsmaxMseConfig
    needs_calibration = False  # data-free: the runner skips calibration and goes to quantize_block

    def check_model(self, adapter: Any) -> None:
        """Refuse asymmetric settings before any work is done, then run the usual divisibility check."""
        if not self.weight.symmetric:
            raise LlmcError("quant.weight.symmetric: absmax_mse is a symmetric method. Set quant.weight.symmetric: true, or use method: rtn.")
        super().check_model(adapter)

    def quantize_block(self, ctx: Any) -> dict[str, Any]:
        """Fake-quantize every linear layer of ``ctx.block`` in place with the searched clip ratios."""
        import torch

        out = {}
        with torch.no_grad():
            for name, linear in ctx.adapter.quant_linears(ctx.block).items():
                qw, ratio = self.quantize_weight(linear.weight)
                linear.weight.data.copy_(qw.dequantize(linear.weight.dtype))
                out[f"{ctx.prefix}.{name}"] = qw
                self.log.append({"layer": f"{ctx.prefix}.{name}", "mean_clip_ratio": round(ratio, 4)})
        return out

    def quantize_weight(self, w: Any) -> tuple[Any, float]:
        """The searched quantization of a ``[out, in]`` weight, and the mean ratio chosen."""
        import torch

        from llmc_core.quant import QuantizedWeight, group_view, qparams, quantize_grouped

        spec, opts = self.weight, self.options
        wg = group_view(w.detach().float(), spec)  # [rows, group]
        amax = wg.abs().amax(dim=-1, keepdim=True)  # [rows, 1]
        best_err = torch.full_like(amax, float("inf"))
        best_ratio = torch.ones_like(amax)
        # One ratio at a time keeps memory at a few copies of the weight, whatever the grid size.
        for ratio in torch.linspace(1.0, 1.0 - opts.max_shrink, opts.grid).tolist():
            scale, zero = qparams(wg, spec, max_val=amax * ratio)
            deq = (quantize_grouped(wg, scale, zero, spec) - zero) * scale
            err = (deq - wg).abs().pow(opts.norm).sum(dim=-1, keepdim=True)
            better = err < best_err  # strict: ties keep the larger ratio (plain RTN first)
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
        scale, zero = qparams(wg, spec, max_val=amax * best_ratio)
        codes = quantize_grouped(wg, scale, zero, spec)
        out_f, in_f = w.shape
        shape = (1, 1) if spec.granularity == "per_tensor" else (out_f, wg.shape[0] // out_f)
        qw = QuantizedWeight(codes.reshape(out_f, in_f).to(torch.int8), scale.reshape(shape), zero.reshape(shape), spec)
        return qw, best_ratio.mean().item()


class Lines(Dataset):
    """Plain text, one sample per non-empty line: a ``.txt`` file or a folder of them.

    Lines starting with ``#`` are comments and skipped, so a prompt list can carry notes. Works for
    ``calib.name`` and ``eval.name``; there is nothing to download.
    """

    name = "lines"

    def load_rows(self, path: str | None, download: bool, purpose: str) -> list[str]:
        if not path:
            raise LlmcError(f"{purpose}.path: the 'lines' dataset needs a path to a .txt file or a folder of them.")
        p = Path(path)
        files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise LlmcError(f"{purpose}.path: {p} is not a .txt file or a folder holding .txt files.")
        rows = [line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines()]
        rows = [r for r in rows if r and not r.startswith("#")]
        if not rows:
            raise LlmcError(f"{purpose}.path: {p} has no non-empty lines.")
        return rows


@hookimpl
def llmc_register_methods(register):
    register(AbsmaxMse)


@hookimpl
def llmc_register_datasets(register):
    register(Lines)
