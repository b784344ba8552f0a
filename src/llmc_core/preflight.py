"""The memory preflight: a run's peak host and device memory, estimated from shapes before the model loads.

:func:`estimate` reads the model's shapes from its config alone (``AutoConfig``; for a ``.gguf``
file only its header), never its weights, and adds up what each stage of the run holds at once:

- always: the runtime (Python, torch, transformers, the tokenizer: :data:`RUNTIME_BYTES`, measured)
  and the model's weights at the load dtype;
- loading: one tensor's conversion copy (the embedding, the largest);
- each evaluation: what its evaluator says (:meth:`llmc_core.api.Evaluator.memory`; PPL: the head's
  logits over a slice of positions and the loss's temporaries, one layer's forward activations,
  tokenizing the text);
- the block pass (methods that calibrate): every calibration token's block inputs and outputs,
  one forward slice's activations, and what the method says it keeps
  (:meth:`llmc_core.api.Method.memory`: GPTQ's kept layer inputs and Hessians, AWQ's recorded
  calls and search buffers, ...);
- from the quantize pass on: the integer codes and scales of every quantized weight;
- saving: one tensor's copy.

The peak is the largest stage's sum. With a CUDA device, the weights (once an evaluation has moved the
model there), activations, Hessians and logits are device memory and the rest host memory. ``N``
ranks (torchrun's ``WORLD_SIZE``; 1 today) each load the model and keep their share of the
calibration tokens. The numbers are estimates: docs/memory.md compares them with measured peaks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc_core.errors import LlmcError

MiB = 2**20
# What the process holds before any model tensor: the interpreter, torch, transformers, the
# tokenizer. Measured on SmolLM2 RTN (CPU, torch 2.13, transformers 5.25): 1103 MB resident with
# 513 MB of weights after the model loaded.
RUNTIME_BYTES = 590 * MiB
# Tokens of one block call in the block pass (llmc_core.blockwise.FORWARD_TOKENS, kept here so the
# preflight imports no torch).
FORWARD_TOKENS = 4096
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class ModelShapes:
    """What the preflight needs of a model, from its config: sizes, counts and the load dtype."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    experts: int = 0  # routed experts per MoE block (0: a dense MLP)
    expert_intermediate: int = 0
    experts_per_token: int = 0
    shared_intermediate: int = 0  # Qwen2-MoE's shared expert
    dtype_bytes: int = 4  # the weights' bytes per value at the load dtype

    @classmethod
    def from_config(cls, cfg: Any, dtype_bytes: int) -> ModelShapes:
        """From a transformers config object (multimodal configs: their ``text_config``)."""
        cfg = getattr(cfg, "text_config", None) or cfg
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0
        moe_i = getattr(cfg, "moe_intermediate_size", None) or (cfg.intermediate_size if experts else 0)
        return cls(
            hidden=hidden, layers=cfg.num_hidden_layers, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or hidden // heads, intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)), experts=experts, expert_intermediate=moe_i if experts else 0,
            experts_per_token=getattr(cfg, "num_experts_per_tok", 0) or 0, shared_intermediate=getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
            dtype_bytes=dtype_bytes,
        )

    @property
    def attn_width(self) -> int:
        """o_proj's input size (heads x head_dim)."""
        return self.heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        """The widest MLP activation one token makes: the intermediate size, or for MoE the routed
        experts' and the shared expert's together."""
        if self.experts:
            return self.experts_per_token * self.expert_intermediate + self.shared_intermediate
        return self.intermediate

    @property
    def widest_input(self) -> int:
        """The largest input of any quantized linear layer (down_proj's, usually)."""
        return max(self.hidden, self.attn_width, self.expert_intermediate if self.experts else self.intermediate, self.shared_intermediate)

    def block_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = h * self.attn_width * 2 + h * kv * 2
        if self.experts:
            mlp = self.experts * 3 * h * self.expert_intermediate + h * self.experts + 3 * h * self.shared_intermediate
        else:
            mlp = 3 * h * self.intermediate
        return attn + mlp + 2 * h

    def quantized_params(self) -> int:
        """Weights of the decoder blocks' linear layers (what a method quantizes)."""
        return self.layers * (self.block_params() - 2 * self.hidden - (self.hidden * self.experts if self.experts else 0))

    def params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.block_params() + self.hidden


@dataclass
class Part:
    """One thing a stage holds: its size, where (``host`` or ``device``) and what makes it smaller."""

    name: str
    bytes: int
    where: str = "device"  # ``device``: where the model computes (the host on a CPU run); or ``host``
    fix: str = ""


@dataclass
class Estimate:
    """The run's estimated peaks: ``host`` (bytes, all ranks on this machine) and ``device`` (one
    rank's device; 0 on a CPU run), each with the stage that gives it and that stage's parts."""

    host: int
    device: int
    host_stage: str
    device_stage: str
    host_parts: list[Part] = field(default_factory=list)
    device_parts: list[Part] = field(default_factory=list)
    ranks: int = 1

    def describe(self) -> str:
        """One line: the peaks and their three biggest parts."""
        def side(total: int, stage: str, parts: list[Part], what: str) -> str:
            top = sorted(parts, key=lambda p: -p.bytes)[:3]
            return f"{what} {mib(total)} MB during {stage} ({', '.join(f'{p.name} {mib(p.bytes)}' for p in top)})"

        text = side(self.host, self.host_stage, self.host_parts, "host")
        if self.device:
            text += "; " + side(self.device, self.device_stage, self.device_parts, "device")
        return text + (f"; {self.ranks} ranks" if self.ranks > 1 else "")

    def as_dict(self) -> dict[str, Any]:
        """MB values for results.json."""
        out: dict[str, Any] = {"host_mb": mib(self.host), "host_stage": self.host_stage, "host_parts_mb": {p.name: mib(p.bytes) for p in self.host_parts}, "ranks": self.ranks}
        if self.device:
            out.update(device_mb=mib(self.device), device_stage=self.device_stage, device_parts_mb={p.name: mib(p.bytes) for p in self.device_parts})
        return out


def mib(n: float) -> float:
    return round(n / MiB, 1)


def estimate(run_config: Any, model_config: Any, device: str = "cpu", ranks: int | None = None) -> Estimate:
    """The peak host and device memory of ``run_config`` on a model whose transformers config is
    ``model_config`` (read by :func:`read_model_config`; no weights). ``device``: ``cpu`` or
    ``cuda``. ``ranks``: torchrun's ``WORLD_SIZE`` (default: the environment's, else 1)."""
    ranks = ranks or int(os.environ.get("WORLD_SIZE", "1") or 1)
    shapes = ModelShapes.from_config(model_config, _dtype_bytes(run_config, model_config))
    on_gpu = device.startswith("cuda")
    weights_bytes = shapes.params() * shapes.dtype_bytes
    runtime = Part("runtime", RUNTIME_BYTES, "host")
    weights_host = Part("weights", weights_bytes, "host", "a smaller model.torch_dtype (bfloat16)")
    stages: list[tuple[str, list[Part]]] = [("load model", [runtime, weights_host, Part("load copy", shapes.vocab * shapes.hidden * 4, "host")])]
    # An evaluation moves the whole model to the device; the block pass moves one block at a time.
    weights_moved = Part("weights", weights_bytes, "device", "base.device: cpu, or eval.inference_per_block: true" if on_gpu else weights_host.fix)
    block_weights = Part("block weights", shapes.block_params() * shapes.dtype_bytes)
    codes: list[Part] = []

    measured: set[int] = set()

    def evals(position: str) -> None:
        for i, (evaluator, options) in enumerate(run_config.evals):
            if position in options.eval_pos:
                per_block = on_gpu and getattr(options, "inference_per_block", False)
                weights = [weights_host, block_weights] if per_block else [weights_moved]
                stages.append((f"eval {position}", [runtime, *weights, *codes, *evaluator.memory(shapes, options, again=i in measured)]))
                measured.add(i)

    evals("pretrain")
    method = run_config.method
    if method is not None:
        if run_config.needs_calibration:
            samples, seq_len = math.ceil(run_config.calib.n_samples / ranks), run_config.calib.seq_len
            tokens = samples * seq_len
            act = shapes.dtype_bytes
            kept_fix = "fewer calib.n_samples or a shorter calib.seq_len (the block pass keeps every calibration token's activations)"
            block = [
                Part("block inputs/outputs", 2 * tokens * shapes.hidden * act, fix=kept_fix),
                Part("forward slice", min(tokens, FORWARD_TOKENS) * (3 * shapes.mlp_width + 4 * shapes.hidden) * act),
            ]
            block += [p if p.fix else Part(p.name, p.bytes, p.where, kept_fix) for p in method.memory(shapes, run_config.special, samples, seq_len)]
            earlier_eval = any("pretrain" in o.eval_pos for _, o in run_config.evals)
            weights = [weights_moved] if earlier_eval or not on_gpu else [weights_host, block_weights]
            stages.append((f"{run_config.quant.method_name} transform", [runtime, *weights, *block]))
        evals("transformed")
        code_bytes = shapes.quantized_params() * (0.5 if getattr(run_config.weight, "bit", 8) <= 4 else 1)
        group = getattr(run_config.weight, "group_size", -1) or -1
        scale_bytes = shapes.quantized_params() / group * 8 if group > 0 else 0
        codes.append(Part("quantized codes", int(code_bytes + scale_bytes), "host"))
        widest = max(shapes.widest_input * shapes.hidden, shapes.hidden * shapes.mlp_width) * 4
        stages.append(("quantize", [runtime, weights_moved, *codes, Part("layer copies", 3 * widest)]))
        evals("fake_quant")
        evals("real_quant")
    if run_config.savers:
        stages.append(("save", [runtime, weights_moved, *codes, Part("save copy", shapes.vocab * shapes.hidden * shapes.dtype_bytes, "host")]))
    if not on_gpu:  # one memory: every part is the host's
        stages = [(name, [Part(p.name, p.bytes, "host", p.fix) for p in parts]) for name, parts in stages]
    return _peaks(stages, ranks)


def _peaks(stages: list[tuple[str, list[Part]]], ranks: int) -> Estimate:
    def total(parts: list[Part], where: str) -> int:
        return sum(p.bytes for p in parts if p.where == where)

    host_stage, host_parts = max(stages, key=lambda s: total(s[1], "host"))
    dev_stage, dev_parts = max(stages, key=lambda s: total(s[1], "device"))
    host_parts = [p for p in host_parts if p.where == "host"]
    dev_parts = [p for p in dev_parts if p.where == "device"]
    return Estimate(ranks * total(host_parts, "host"), total(dev_parts, "device"), host_stage, dev_stage, host_parts, dev_parts, ranks)


def _dtype_bytes(run_config: Any, model_config: Any) -> int:
    """Bytes per weight at the load dtype: ``model.torch_dtype``, or for ``auto`` the checkpoint's
    (a ``.gguf`` file is dequantized to float32, as the loader does)."""
    name = getattr(run_config.model, "torch_dtype", "auto")
    if name == "auto":
        if str(getattr(run_config.model, "path", "")).endswith(".gguf"):
            return 4
        name = str(getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "float32")
    return DTYPE_BYTES.get(str(name).replace("torch.", ""), 4)


def read_model_config(model_section: Any) -> Any:
    """The model's transformers config, from its config.json or a ``.gguf`` file's header alone."""
    from transformers import AutoConfig

    path = Path(str(model_section.path))
    where, extra = (str(path.parent), {"gguf_file": path.name}) if path.suffix == ".gguf" else (str(path), {})
    return AutoConfig.from_pretrained(where, trust_remote_code=getattr(model_section, "trust_remote_code", False), **extra)


# -- what the machine has -----------------------------------------------------------------------


def available_host() -> int | None:
    """Bytes this process may still take: /proc/meminfo's MemAvailable, lowered to what the
    cgroup's memory.max leaves; None where neither is known."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
    except OSError:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            found = left if found is None else min(found, left)
    except (OSError, ValueError):
        pass
    return found


def resident_bytes() -> int:
    """The process's resident memory now (already part of the estimate's runtime)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check(est: Estimate, host_free: int | None, device_free: int | None, own: int = 0) -> None:
    """Refuse, in one line, an estimate above what the machine has: ``host_free`` bytes (besides
    ``own``, what this process holds already) and ``device_free`` on the device."""
    problems = []
    own = min(own, RUNTIME_BYTES)  # the runtime the estimate counts is (mostly) resident already
    if host_free is not None and est.host - own > host_free:
        have = f"{gib(host_free + own)} GB it can have ({gib(host_free)} GB available + {gib(own)} GB llmc holds already)"
        problems.append(_refusal("host memory", est.host, have, est.host_stage, est.host_parts))
    if device_free is not None and est.device > device_free:
        problems.append(_refusal("device memory", est.device, f"{gib(device_free)} GB free on the device", est.device_stage, est.device_parts))
    if problems:
        raise LlmcError(*problems)


def _refusal(what: str, need: int, have: str, stage: str, parts: list[Part]) -> str:
    top = sorted(parts, key=lambda p: -p.bytes)
    fixes = list(dict.fromkeys(p.fix for p in top if p.fix))[:2]
    shown = ", ".join(f"{p.name} {gib(p.bytes)}" for p in top[:3])
    return f"memory: this run needs about {gib(need)} GB of {what} during {stage} ({shown}), more than the {have}; try {' or '.join(fixes) or 'a machine with more memory'}."


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"
