"""Tiny randomly initialised models of each supported layout, built from configs (no downloads)."""

from __future__ import annotations

from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from sae_engine.models import from_config

_COMMON = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=16, query_pre_attn_scalar=16),
}


def tiny_model(layout: str, seed: int = 0):
    model = from_config(CONFIGS[layout](), seed=seed)
    return model.float()
