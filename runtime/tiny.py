"""Tiny random-initialised models with real tokenizers, so tests run in seconds.

The architecture (Llama for SmolLM2, Gemma-3 for Gemma) and the tokenizer are the
real ones; only depth and width shrink. Same seed, same weights.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from runtime import models


@cache
def _tokenizer(alias: str) -> Any:
    return models.load_tokenizer(alias)


def build_tiny(alias: str, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> tuple[Any, Any]:
    """Return (model, tokenizer): `alias`'s architecture and tokenizer, random weights, fp32, eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(models.resolve(alias))
    heads = 4
    config.num_hidden_layers = layers
    config.hidden_size = hidden
    config.intermediate_size = hidden * 2
    config.num_attention_heads = heads
    config.num_key_value_heads = 2
    config.head_dim = hidden // heads
    if hasattr(config, "layer_types") and config.layer_types is not None:
        # Keep both attention kinds (Gemma-3 interleaves sliding and full layers).
        config.layer_types = (["sliding_attention", "full_attention"] * layers)[:layers]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, _tokenizer(alias)
