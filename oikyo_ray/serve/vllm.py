"""Generate a Ray Serve LLM (vLLM) config from an oikyo config, for GPU clusters.

    oikyo serve CONFIG.yaml --export-vllm serve/vllm.yaml      then: serve deploy serve/vllm.yaml

vLLM loads adapters dynamically from `serve.adapter_root` (an s3:// or gs:// prefix holding one
folder per adapter: <root>/<name>/adapter_config.json + adapter_model.safetensors, the layout
oikyo's runs export); clients select one with `"model": "<base_model_name>:<adapter name>"`.
"""

from __future__ import annotations

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def vllm_serve_config(cfg: OikyoConfig, max_lora_rank: int | None = None) -> dict:
    sc = cfg.serve
    if sc.host not in LOOPBACK:
        # ray.serve.llm's OpenAI app checks no bearer token: bound beyond loopback it would answer anyone
        raise ConfigError(
            f"refusing to export an unauthenticated vLLM endpoint on serve.host={sc.host}: "
            "ray.serve.llm's OpenAI app has no API-key check",
            hint="export with serve.host=127.0.0.1 and reach it through an authenticating gateway, "
            "or serve with `oikyo serve` (bearer-token auth on by default)",
        )
    if sc.adapter_root and not sc.adapter_root.startswith(("s3://", "gs://")):
        raise ConfigError(
            "serve.adapter_root must be an s3:// or gs:// prefix for ray.serve.llm's dynamic LoRA",
            hint="upload the adapter folders there first",
        )
    llm: dict = {
        "model_loading_config": {"model_id": sc.base_model_name, "model_source": cfg.model.name_or_path},
        "engine_kwargs": {
            "dtype": cfg.model.dtype,
            "trust_remote_code": cfg.model.trust_remote_code,
            "enable_lora": bool(sc.adapter_root),
            "max_lora_rank": max_lora_rank or cfg.method.lora.r,
        },
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": sc.min_replicas,
                "max_replicas": sc.max_replicas,
                "target_ongoing_requests": sc.target_ongoing_requests,
            },
            "max_ongoing_requests": sc.max_ongoing_requests,
        },
    }
    if sc.adapter_root:
        llm["lora_config"] = {
            "dynamic_lora_loading_path": sc.adapter_root,
            "max_num_adapters_per_replica": sc.max_adapters_per_replica,
        }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": sc.host, "port": sc.port},
        "applications": [
            {
                "name": "oikyo-vllm",
                "route_prefix": sc.route_prefix,
                "import_path": "ray.serve.llm:build_openai_app",
                "args": {"llm_configs": [llm]},
            }
        ],
    }
