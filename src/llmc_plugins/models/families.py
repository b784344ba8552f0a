"""The Llama-layout families: one small class each (model types accepted, and their adapter)."""

from __future__ import annotations

from typing import ClassVar

from llmc_core.adapters import LinearGroup, ModelAdapter
from llmc_core.api import ModelFamily
from llmc_plugins.models.hf import HFModelConfig, load_hf


class LlamaAdapter(ModelAdapter):
    """Llama-layout decoder block: attention (q/k/v/o) after ``input_layernorm``, gated MLP
    (gate/up/down) after ``post_attention_layernorm``."""

    def linear_groups(self, block) -> list[LinearGroup]:
        attn = block.self_attn
        groups = [
            LinearGroup("qkv", "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn", inspect_kwargs=True),
            LinearGroup("o", "self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"),
            LinearGroup("gate_up", "post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"),
            LinearGroup("down", "mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj"),
        ]
        if attn.v_proj.weight.shape[0] != attn.o_proj.weight.shape[1]:
            # Grouped-query attention: v_proj has fewer outputs than o_proj has inputs, so a scale on
            # o_proj's inputs cannot be folded into v_proj.
            groups[1].extra["skip"] = f"v_proj has {attn.v_proj.weight.shape[0]} outputs but o_proj has {attn.o_proj.weight.shape[1]} inputs (grouped-query attention)"
        return groups


class Llama(ModelFamily):
    """Llama and Llama-layout checkpoints (Llama 2/3, SmolLM2, TinyLlama...)."""

    name = "llama"
    Config = HFModelConfig
    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    adapter_class: ClassVar[type[ModelAdapter]] = LlamaAdapter

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


class Qwen2(Llama):
    """Qwen2 / Qwen2.5 (Llama layout, biases on q/k/v)."""

    name = "qwen2"
    model_types = ("qwen2",)


FAMILIES = (Llama, SmolLM2, Mistral, Qwen2)
