"""Hugging Face decoder families as data: one :class:`LayerMapping` table per block layout.

Each family names the ``model_type`` values it accepts and its adapter; an adapter is a table
(``{prev, layers, inspect}`` rows, resolved against each block) plus a few attributes. Adding a
family with a known layout is a few lines here; the code a table cannot express (Gemma's
``1 + weight`` norm, fused rows, fused 3-D experts) lives once in :mod:`llmc_core.layer_ops`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from llmc_core.adapters import GQA, LayerMapping, ModelAdapter
from llmc_core.api import ModelFamily
from llmc_plugins.models.hf import HFModelConfig, load_hf

# -- tables ------------------------------------------------------------------------------------

QKV = LayerMapping("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", inspect_kwargs=True)
O_PROJ = LayerMapping("o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", same_width=GQA)
DOWN = LayerMapping("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")

LLAMA = (QKV, O_PROJ, LayerMapping("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"), DOWN)

# Gemma 2/3 "sandwich" norms: the MLP reads pre_feedforward_layernorm; the post_* norms feed the
# residual stream, no quantized layer.
GEMMA = (QKV, O_PROJ, LayerMapping("gate_up", "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"), DOWN)

# Phi-3 / Phi-4: fused q/k/v and gate/up; o_proj's scale folds into qkv_proj's v rows, down_proj's
# into gate_up_proj's up half.
PHI3 = (
    LayerMapping("qkv", "input_layernorm", ("self_attn.qkv_proj",), "self_attn", inspect_kwargs=True),
    LayerMapping("o", "self_attn.qkv_proj:v", ("self_attn.o_proj",), "self_attn.o_proj", same_width=GQA),
    LayerMapping("gate_up", "post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    LayerMapping("down", "mlp.gate_up_proj:up", ("mlp.down_proj",), "mlp.down_proj"),
)

# MoE blocks: the gate/up of every expert (and a shared expert) against the post-attention norm,
# measured on the whole MoE block's output; the routers read that input too, so they take the
# scale (and stay float). Each expert's down_proj against its own up rows. Dense blocks of the
# same model (Qwen MoE ``mlp_only_layers``) match the Llama rows instead.
EXPERT_DOWN = LayerMapping("down", "mlp.experts.*.gate_up_proj:up", ("mlp.experts.*.down_proj",), optional=True)
DENSE_MLP = (LayerMapping("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", optional=True), LayerMapping("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", optional=True))
MIXTRAL = (QKV, O_PROJ, LayerMapping("experts_gate_up", "post_attention_layernorm", ("mlp.experts.*.gate_up_proj",), "mlp", also_scale=("mlp.gate",), optional=True), EXPERT_DOWN, *DENSE_MLP)
QWEN2_MOE = (
    QKV,
    O_PROJ,
    LayerMapping("experts_gate_up", "post_attention_layernorm", ("mlp.experts.*.gate_up_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), "mlp", also_scale=("mlp.gate", "mlp.shared_expert_gate"), optional=True),
    EXPERT_DOWN,
    LayerMapping("shared_down", "mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj", optional=True),
    *DENSE_MLP,
)
ROUTERS = {"mlp.gate": "router (stays float)", "mlp.shared_expert_gate": "shared-expert gate, a router (stays float)"}


class LlamaAdapter(ModelAdapter):
    """Llama-layout decoder block: attention (q/k/v/o) after ``input_layernorm``, gated MLP
    (gate/up/down) after ``post_attention_layernorm``. Also Mistral, Qwen2 and Qwen3 (Qwen3's
    per-head q_norm/k_norm sit after q/k_proj, inside what the qkv group measures)."""

    mappings = LLAMA


class GemmaAdapter(ModelAdapter):
    """Gemma 2 / Gemma 3 text: norms scale by ``1 + weight``; the MLP reads the pre-feedforward norm."""

    mappings = GEMMA
    norm_offset = 1.0


class Phi3Adapter(ModelAdapter):
    """Phi-3 / Phi-4: fused ``qkv_proj`` (q, k, v rows by head counts) and ``gate_up_proj`` (halves)."""

    mappings = PHI3
    fused_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "self_attn.qkv_proj": ("q:num_attention_heads", "k:num_key_value_heads", "v:num_key_value_heads"),
        "mlp.gate_up_proj": ("gate:1", "up:1"),
    }


class MoEAdapter(ModelAdapter):
    """Mixtral / Qwen3-MoE: fused 3-D experts (``mlp.experts.<e>.gate_up_proj``, ``.down_proj``)."""

    mappings = MIXTRAL
    fused_parts: ClassVar[dict[str, tuple[str, ...]]] = {"mlp.experts.*.gate_up_proj": ("gate:1", "up:1")}
    keep_float: ClassVar[dict[str, str]] = ROUTERS


class Qwen2MoEAdapter(MoEAdapter):
    """Qwen2-MoE: experts plus a shared expert (quantized) behind a sigmoid gate (float)."""

    mappings = QWEN2_MOE


# -- families ----------------------------------------------------------------------------------


class Llama(ModelFamily):
    """Llama and Llama-layout checkpoints (Llama 2/3, SmolLM2, TinyLlama...)."""

    name = "llama"
    Config = HFModelConfig
    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    adapter_class: ClassVar[type[ModelAdapter]] = LlamaAdapter
    special: ClassVar[str] = "the reference layout"

    def load(self, config):
        return load_hf(config, self.model_types, self.name)

    def adapter(self, model):
        return self.adapter_class(model)


class SmolLM2(Llama):
    """SmolLM2 (Llama architecture; ties lm_head to the embeddings, which llmc never touches)."""

    name = "smollm2"


class Mistral(Llama):
    """Mistral (Llama layout with grouped-query attention)."""

    name = "mistral"
    model_types = ("mistral",)
    special = "grouped-query attention (the o_proj group is skipped)"


class Qwen2(Llama):
    """Qwen2 / Qwen2.5 (Llama layout, biases on q/k/v)."""

    name = "qwen2"
    model_types = ("qwen2",)
    special = "biases on q/k/v (divided with the scale when folding into v_proj)"


class Qwen3(Llama):
    """Qwen3 (Llama layout with per-head q_norm/k_norm inside attention)."""

    name = "qwen3"
    model_types = ("qwen3",)
    special = "per-head q_norm/k_norm inside attention (after q/k_proj: the qkv fold is unchanged)"


class Gemma2(Llama):
    """Gemma 2 (norms scale by 1 + weight, sandwich norms, embedding scaling, logit soft-capping)."""

    name = "gemma2"
    model_types = ("gemma2",)
    adapter_class = GemmaAdapter
    special = "RMSNorm scales by 1 + weight (folds as (1 + w)/s - 1); pre_feedforward_layernorm feeds gate/up; logit soft-capping"


class Gemma3Text(Llama):
    """Gemma 3 text-only (Gemma 2's norms plus per-head q_norm/k_norm, sliding/global attention)."""

    name = "gemma3_text"
    model_types = ("gemma3_text",)
    adapter_class = GemmaAdapter
    special = "as gemma2, plus per-head q_norm/k_norm and local/global rotary embeddings per layer"


class Phi3(Llama):
    """Phi-3 and Phi-4 (fused qkv_proj and gate_up_proj)."""

    name = "phi3"
    model_types = ("phi3",)
    adapter_class = Phi3Adapter
    special = "fused qkv_proj / gate_up_proj: o_proj's scale folds into the v rows, down_proj's into the up half"


class Mixtral(Llama):
    """Mixtral (MoE: fused 3-D experts, top-k router)."""

    name = "mixtral"
    model_types = ("mixtral",)
    adapter_class = MoEAdapter
    special = "MoE, fused 3-D experts quantized per expert; router float"


class Qwen2MoE(Llama):
    """Qwen2-MoE / Qwen1.5-MoE (fused experts plus a gated shared expert)."""

    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    adapter_class = Qwen2MoEAdapter
    special = "MoE with a shared expert (quantized) and its sigmoid gate (float)"


class Qwen3MoE(Llama):
    """Qwen3-MoE (fused experts, per-head q_norm/k_norm)."""

    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    adapter_class = MoEAdapter
    special = "MoE, fused 3-D experts; per-head q_norm/k_norm"


FAMILIES = (Llama, SmolLM2, Mistral, Qwen2, Qwen3, Gemma2, Gemma3Text, Phi3, Mixtral, Qwen2MoE, Qwen3MoE)


class GenericAdapter(ModelAdapter):
    """A model of no known family: its decoder blocks are the longest ``nn.ModuleList``, its
    weights every linear layer (and fused 3-D expert tensor) inside them; no layer mappings, so
    only methods that need no layer groups (RTN) can run."""

    def __init__(self, model: Any):
        super().__init__(model)
        import torch

        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
        self.blocks_path = max(lists, key=lambda nm: len(nm[1]))[0] if lists else "model.layers"
        parent = self.blocks_path.rsplit(".", 1)[0] if "." in self.blocks_path else ""
        root = model.get_submodule(parent) if parent else model
        self.pre_block_paths = tuple(f"{parent}.{n}" if parent else n for n, _ in root.named_children() if f"{parent}.{n}".lstrip(".") != self.blocks_path)

    def linear_groups(self, block):
        types = ", ".join(sorted({t for f in supported_families() for t in getattr(f, "model_types", ())}))
        raise NotImplementedError(f"'{getattr(self.model.config, 'model_type', '?')}' is no supported family (supported model types: {types})")


class Auto(ModelFamily):
    """Picks the family from the checkpoint's ``model_type`` (config.json, or what transformers reads from a GGUF)."""

    name = "auto"
    Config = HFModelConfig

    def __init__(self):
        self.family: Any = None

    def load(self, config):
        from llmc_plugins.models.hf import read_model_type

        model_type = read_model_type(config)
        families = supported_families()
        chosen = next((f for f in families if model_type in getattr(f, "model_types", ())), None)
        if chosen is None:
            import logging

            supported = ", ".join(sorted({t for f in families for t in getattr(f, "model_types", ())}))
            logging.getLogger("llmc").warning(
                "model.type: auto: %s is a '%s' model, which no llmc family supports (supported: %s); "
                "quant.method: RTN works on any model whose linear layers llmc can find, methods that need layer mappings (AWQ) do not.",
                config.path, model_type, supported,
            )
            self.family = None
            return load_hf(config, (model_type,), "auto")
        self.family = chosen()
        return self.family.load(config)

    def adapter(self, model):
        return self.family.adapter(model) if self.family is not None else GenericAdapter(model)


def supported_families() -> list[type]:
    """Every registered model family that names the ``model_type`` values it loads (also plugins')."""
    from llmc_core.plugins import get_manager

    manager = get_manager()
    return [manager.get("model", n, "model.type") for n in manager.names("model")]
