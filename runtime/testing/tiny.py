"""Tiny random-initialised models with real tokenizers, so tests run in seconds.

The architecture (Llama for SmolLM2, Gemma-3 for Gemma) and the tokenizer are the
real ones; only depth and width shrink. Same seed, same weights.

This is a test fixture, not serving code. `build_tiny` makes a model in the calling
process; `save_tiny` writes exactly that model (save_pretrained) and its tokenizer
to the folder that `models.load("tiny:<alias>[@seed]")` reads, so member actors in
other processes, `serve run deploy/serve_config_tiny.yaml` and in-process tests all
run the same weights. `consort prepare tiny:<alias>` and the test sessions call
`save_tiny`; models.load never imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from functools import cache
from pathlib import Path
from typing import Any

from consort.runtime import models

LAYERS, HIDDEN = 2, 64
# Bump when build_tiny changes what it builds for the same (alias, seed): saved folders are then rebuilt.
BUILD_VERSION = 2


@cache
def _tokenizer(alias: str) -> Any:
    return models.load_tokenizer(alias)


def build_tiny(alias: str, *, layers: int = LAYERS, hidden: int = HIDDEN, seed: int = 0) -> tuple[Any, Any]:
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
        # Keep the attention kinds the real model has: Gemma-3 interleaves sliding and full layers;
        # Qwen2.5 lists only full ones (a sliding layer there would have no window at all).
        kinds = (
            ["sliding_attention", "full_attention"]
            if "sliding_attention" in config.layer_types
            else ["full_attention"]
        )
        config.layer_types = (kinds * layers)[:layers]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, _tokenizer(alias)


def fingerprint(alias: str, seed: int) -> dict[str, Any]:
    """What a saved folder records about how it was built; a folder that differs is rebuilt.

    The library versions are part of it because random initialisation is only promised
    to repeat on the same torch and transformers: after an upgrade the folder is rebuilt
    so it keeps holding exactly what build_tiny gives in process.
    """
    import torch
    import transformers

    return {
        "tiny": alias,
        "seed": seed,
        "layers": LAYERS,
        "hidden": HIDDEN,
        "build_version": BUILD_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def is_saved(reference: str) -> bool:
    alias, seed = models.parse_tiny(reference)
    marker = models.tiny_dir(reference) / "consort.json"
    try:
        return json.loads(marker.read_text()) == fingerprint(alias, seed)
    except (OSError, ValueError):
        return False


def save_tiny(reference: str) -> Path:
    """Make sure `tiny:<alias>[@seed]`'s folder holds build_tiny's model and tokenizer; return the folder.

    A folder built the same way is kept as it is. Otherwise the model is built and
    written to a temporary folder that is renamed into place, so another process (a
    member actor, a second test session) never reads a half-written folder.
    """
    alias, seed = models.parse_tiny(reference)
    out_dir = models.tiny_dir(reference)
    if is_saved(reference):
        return out_dir
    model, tokenizer = build_tiny(alias, seed=seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "consort.json").write_text(json.dumps(fingerprint(alias, seed)))
        if out_dir.exists():
            # Stale (other versions or parameters): move it aside in one rename, then drop it.
            old_dir = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                out_dir.rename(old_dir)
            except FileNotFoundError:
                pass  # another process moved it first
            else:
                shutil.rmtree(old_dir, ignore_errors=True)
        try:
            tmp_dir.rename(out_dir)
        except OSError:
            # Another process put its folder in place first; it holds the same weights if it is current.
            if not is_saved(reference):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
