"""The run report: ``report.md`` and ``report.png`` beside ``results.json`` in ``save.save_path``.

``report.md`` holds, in this order: a summary, the perplexity table by position, the other
(downstream) metrics, time and peak memory per stage, the quantization error per layer (where the
damage is), the quantized weights by kind and the skipped ones with the reason, the resolved config as YAML and the environment (versions, device). ``report.png``
plots the per-layer error by block and the time per stage; it needs matplotlib
(``pip install 'llmc[report]'``) and is skipped, with a note in ``report.md``, without it.

Everything is rendered from the run's :class:`~llmc_core.state.RunState` (``results``, ``stages``, the layer-error rows),
the same data ``results.json`` holds.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmc_core.fsutil import atomic_file

if TYPE_CHECKING:
    from llmc_core.results import EvalRecord
    from llmc_core.state import RunState

PLOT_NAME = "report.png"


def write_report(state: RunState, folder: str | Path) -> Path:
    """Write ``report.md`` (and ``report.png`` when matplotlib is installed) into ``folder``."""
    folder = Path(folder)
    rows = state.layer_errors.finish()
    try:
        plot_note = _write_plot(folder / PLOT_NAME, rows, state.stages)
    except ImportError:
        plot_note = "The plot was skipped: matplotlib is not installed (`pip install 'llmc[report]'`)."
    text = render_markdown(state, rows, plot_note)
    path = folder / "report.md"
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def render_markdown(state: RunState, layer_rows: list[dict[str, Any]], plot_note: str | None) -> str:
    """The text of ``report.md``; ``plot_note`` is None when the plot was written."""
    import yaml

    cfg = state.config
    out = ["# llmc run report", ""]
    out += _summary(state)
    out += ["", "## Perplexity by position", ""]
    out += _ppl_table([r for r in state.results if r.metric == "perplexity"])
    others = [r for r in state.results if r.metric != "perplexity"]
    out += ["", "## Downstream metrics", ""]
    out += _table(("position", "evaluator", "dataset", "metric", "value", "seconds"), [(r.position, r.evaluator, r.dataset, r.metric, r.shown_value(), f"{r.seconds:.1f}") for r in others]) if others else ["None in this run."]
    out += ["", "## Time and peak memory per stage", ""]
    out += _stage_table(state.stages)
    out += _memory_line(getattr(state, "memory_summary", None))
    out += ["", "## Quantization error per layer", ""]
    out += _layer_section(layer_rows)
    out += ["", "## Quantized and skipped weights", ""]
    out += _weights_section(state)
    out += ["", f"![per-layer error and stage times]({PLOT_NAME})" if plot_note is None else f"_{plot_note}_"]
    out += ["", "## Config", "", "```yaml", yaml.safe_dump(cfg.raw, sort_keys=False).rstrip(), "```"]
    out += ["", "## Environment", ""]
    out += [f"- {k}: {v}" for k, v in environment(state).items()]
    return "\n".join(out) + "\n"


def environment(state: RunState | None = None) -> dict[str, str]:
    """Versions and device, as strings."""
    import importlib.metadata as md

    from llmc_core import __version__

    env = {"llmc": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "transformers"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = "not installed"
    device = getattr(state, "device", None)
    env["device"] = str(device) if device is not None else "not chosen"
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        env["device"] += f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    else:
        env["cpu"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"
    if "torch" in sys.modules:  # the build's own version names it: 2.13.0+cpu, 2.14.1+cu130
        torch = sys.modules["torch"]
        env["torch"] = torch.__version__
        env["torch threads"] = str(torch.get_num_threads())
    return env


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------


def _summary(state: RunState) -> list[str]:
    cfg = state.config
    scheme = getattr(cfg, "scheme", None) or getattr(cfg, "weight", None)  # a Scheme, or a weight spec alone
    method = f"{cfg.quant.method_name} ({scheme.describe()})" if cfg.quant is not None else "none (evaluation only)"
    model = cfg.raw.get("model", {})
    lines = [
        f"- model: {model.get('type')} from `{model.get('path')}`",
        f"- method: {method}",
        *([f"- recipe: " + ", then ".join(f"{t['method']} ({t['seconds']:.1f} s in the block pass)" for t in state.method.timings())] if hasattr(getattr(state, "method", None), "timings") else []),
        f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {sum(s['seconds'] for s in state.stages):.1f} s over {len(state.stages)} stages",
    ]
    ckpt = getattr(state, "checkpoint", None)
    if ckpt is not None and ckpt.restored_blocks:
        lines.append(f"- resumed: blocks 0-{ckpt.restored_blocks - 1} and the evaluations before the interruption came from the checkpoint")
    if state.saved:
        lines.append("- saved: " + ", ".join(f"{name} → `{path}`" for name, path in state.saved.items()))
    kept = getattr(state, "kept_outputs", [])
    if kept:
        lines.append("- **kept from an earlier run** (save.overwrite: true replaced only what this run wrote; these are not this run's): " + ", ".join(f"`{k}`" for k in kept))
    return lines


def _weights_section(state: RunState) -> list[str]:
    """Quantized weights by kind, and every weight left float grouped by the reason."""
    if getattr(state, "adapter", None) is None or state.config.quant is None:
        return ["No weights were quantized in this run."]
    from llmc_core.weights import weight_report

    counts, skipped = weight_report(state.adapter, set(state.quantized))
    lines = ["Quantized: " + (", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none") + f" ({sum(counts.values())} weights).", ""]
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped.items():
        by_reason.setdefault(why, []).append(name)
    rows = [(why, str(len(names)), ", ".join(f"`{n}`" for n in names[:3]) + (" ..." if len(names) > 3 else "")) for why, names in by_reason.items()]
    return lines + (_table(("skipped because", "weights", "e.g."), rows) if rows else ["Nothing was skipped."])


def _ppl_table(records: list[EvalRecord]) -> list[str]:
    if not records:
        return ["No perplexity was measured."]
    positions = list(dict.fromkeys(r.position for r in records))
    keys = list(dict.fromkeys((r.evaluator, r.dataset) for r in records))
    value = {(r.evaluator, r.dataset, r.position): r.value for r in records}
    header = ("dataset", *positions) + (("change vs pretrain",) if "pretrain" in positions and len(positions) > 1 else ())
    rows = []
    for ev, ds in keys:
        cells = [f"{value[ev, ds, p]:.4f}" if (ev, ds, p) in value else "—" for p in positions]
        if len(header) > len(positions) + 1:
            base, last = value.get((ev, ds, "pretrain")), value.get((ev, ds, positions[-1]))
            cells.append(f"{100 * (last / base - 1):+.2f}% ({positions[-1]})" if base and last is not None else "—")
        rows.append((ds if ev == "ppl" else f"{ds} ({ev})", *cells))
    return _table(header, rows)


def _stage_table(stages: list[dict[str, Any]]) -> list[str]:
    if not stages:
        return ["No stage finished."]
    cuda = any("peak_cuda_mb" in s for s in stages)
    header = ("stage", "seconds", "peak RSS (MB)") + (("peak CUDA (MB)",) if cuda else ())
    rows = [(s["stage"], f"{s['seconds']:.1f}", f"{s['peak_rss_mb']:.0f}") + ((f"{s.get('peak_cuda_mb', 0):.0f}",) if cuda else ()) for s in stages]
    rows.append(("**total**", f"{sum(s['seconds'] for s in stages):.1f}", f"{max(s['peak_rss_mb'] for s in stages):.0f}") + (("",) if cuda else ()))
    return _table(header, rows)


def _memory_line(summary: Any) -> list[str]:
    """The preflight's estimate beside the measured peaks (``Run.memory_summary``), when there is one."""
    found = summary() if callable(summary) else None
    if not found or found.get("measured_peak_rss_mb") is None:
        return []
    est, measured = found["estimate"], found["measured_peak_rss_mb"]
    top = ", ".join(f"{k} {v:.0f}" for k, v in sorted(est["host_parts_mb"].items(), key=lambda kv: -kv[1])[:4])
    line = f"Memory preflight (docs/memory.md): estimated host peak {est['host_mb']:.0f} MB during {est['host_stage']} ({top}); measured {measured:.0f} MB ({(est['host_mb'] - measured) / measured:+.0%})"
    if "device_mb" in est:
        line += f"; estimated device peak {est['device_mb']:.0f} MB, measured {found.get('measured_peak_cuda_mb', 0):.0f} MB"
    return ["", line + "."]


def layer_metric(rows: list[dict[str, Any]]) -> str:
    """``output_rel_mse`` when every row has it, else ``weight_rel_mse``."""
    return "output_rel_mse" if rows and all(r["output_rel_mse"] is not None for r in rows) else "weight_rel_mse"


def _layer_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["No layer was quantized in this run."]
    metric = layer_metric(rows)
    what = (
        "relative MSE of each layer's output, ||x(W−Q)ᵀ||² / ||xWᵀ||², on a few tokens x that reached the layer "
        "(from the calibration pass, or from the pretrain evaluation for methods without calibration data)"
        if metric == "output_rel_mse"
        else "relative MSE of each layer's weight, ||W−Q||² / ||W||² (the method used no calibration data, so no layer inputs were seen)"
    )
    names = list(dict.fromkeys(r["name"] for r in rows))
    grid = {(r["block"], r["name"]): r[metric] for r in rows}
    blocks = sorted({r["block"] for r in rows})
    lines = [f"Values: {what}. Larger is worse.", ""]
    worst = sorted(rows, key=lambda r: -r[metric])[:5]
    lines += ["Largest errors: " + "; ".join(f"`{r['layer']}` {r[metric]:.2e}" for r in worst) + ".", ""]
    body = [(str(b), *(f"{grid[b, n]:.2e}" if (b, n) in grid else "—" for n in names)) for b in blocks]
    means = [sum(grid[b, n] for b in blocks if (b, n) in grid) / max(1, sum((b, n) in grid for b in blocks)) for n in names]
    body.append(("**mean**", *(f"{m:.2e}" for m in means)))
    return lines + _table(("block", *names), body)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------


def _write_plot(path: Path, rows: list[dict[str, Any]], stages: list[dict[str, Any]]) -> None:
    """Per-layer error by block (one line per layer name) and seconds per stage, as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global backend switch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_err, ax_time = fig.subplots(1, 2, width_ratios=(3, 2))
    if rows:
        metric = layer_metric(rows)
        for name in dict.fromkeys(r["name"] for r in rows):
            pts = sorted((r["block"], r[metric]) for r in rows if r["name"] == name)
            ax_err.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], marker="o", ms=3, label=name)
        ax_err.set_yscale("log")
        ax_err.set_xlabel("block")
        ax_err.xaxis.get_major_locator().set_params(integer=True)
        ax_err.set_ylabel("output relative MSE" if metric == "output_rel_mse" else "weight relative MSE")
        ax_err.legend(fontsize=7, ncol=2)
        ax_err.grid(True, which="both", alpha=0.3)
    else:
        ax_err.text(0.5, 0.5, "no quantized layers", ha="center", va="center")
    ax_err.set_title("Quantization error per layer")
    labels = [s["stage"] for s in stages]
    ax_time.barh(range(len(labels)), [s["seconds"] for s in stages], color="tab:gray")
    ax_time.set_yticks(range(len(labels)), labels, fontsize=7)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("seconds")
    ax_time.set_title("Time per stage")
    FigureCanvasAgg(fig)
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
