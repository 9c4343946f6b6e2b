"""Will the model fit where it is going to be served? Estimated from its config alone, before
any training (Ray-free): a miss is reported before hours are spent on a model that cannot ship.

Weights are counted exactly by building the model on PyTorch's meta device (shapes, no memory);
the KV cache is 2 (keys, values) x layers x KV heads x head size per token, for a full batch of
the longest sequences the server accepts. Activations and the allocator's slack come on top:
keep a margin.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import ConfigError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GB = 1024**3


def serve_memory(cfg: OikyoConfig, model_path: str) -> dict:
    """Estimated serving memory in GiB: weights, KV cache, total."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    size = BYTES[cfg.model.dtype]
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tokens = cfg.serve.max_batch_size * (cfg.data.max_length + cfg.serve.max_tokens_limit)
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * size * tokens
    weights = params * size
    return {"params": params, "weights_gb": weights / GB, "kv_cache_gb": kv / GB, "total_gb": (weights + kv) / GB}


def check_serve_memory(cfg: OikyoConfig, model_path: str) -> dict | None:
    """Refuse a model over `model.max_serve_memory_gb` (None: not checked); returns the estimate."""
    limit = cfg.model.max_serve_memory_gb
    if limit is None:
        return None
    m = serve_memory(cfg, model_path)
    if m["total_gb"] > limit:
        raise ConfigError(
            f"serving {cfg.model.name_or_path} needs about {m['total_gb']:.2f} GiB ({m['weights_gb']:.2f} weights "
            f"at {cfg.model.dtype} + {m['kv_cache_gb']:.2f} KV cache), over model.max_serve_memory_gb={limit:g}",
            hint="pick a smaller base, a 16-bit model.dtype, or lower serve.max_batch_size, "
            "serve.max_tokens_limit or data.max_length",
        )
    return m
