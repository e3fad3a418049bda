"""A tiny random-weight Llama written to disk, for the demo and the tests (no model hub)."""

from __future__ import annotations

import json
from pathlib import Path

# head_dim 32 is the smallest head size vLLM's CPU attention accepts.
TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def make_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """Write config.json and random safetensors weights for a 2-layer Llama; reuse them if present."""
    directory = Path(directory)
    if (directory / "model.safetensors").exists() and (directory / "config.json").exists():
        if json.loads((directory / "config.json").read_text()).get("hidden_size") == 64:
            return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA_CONFIG.items() if k != "architectures"})
    model = LlamaForCausalLM(config).to(torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
