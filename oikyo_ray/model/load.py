"""Load a base model and tokenizer from a hub id, local dir or s3:// prefix (Ray-free)."""

from __future__ import annotations

from pathlib import Path

from oikyo_ray.config import DEMO_MODEL, ModelConfig
from oikyo_ray.errors import ModelError
from oikyo_ray.model.chat_template import ensure_chat_template

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local dir or hub id that `from_pretrained` accepts; builds or fetches what it must."""
    if cfg.name_or_path == DEMO_MODEL:
        from oikyo_ray.model.tiny import ensure_tiny_model

        return str(ensure_tiny_model(cfg.cache_dir))
    if cfg.name_or_path.startswith("s3://"):
        from oikyo_ray.storage import download_dir

        dest = Path(cfg.cache_dir).expanduser() / "s3" / cfg.name_or_path[len("s3://") :].strip("/")
        return str(download_dir(cfg.name_or_path, dest))
    return cfg.name_or_path


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def _hint(path: str) -> str:
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        return f"no directory {path}: set model.name_or_path to a saved model dir, a hub id or an s3:// prefix"
    return "check model.name_or_path; offline machines need a local dir or s3:// copy (HF_HUB_OFFLINE=1)"


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer from '{path}': {e}", hint=_hint(path)) from None
    ensure_chat_template(tok)
    return tok


def load_model(cfg: ModelConfig, path: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=getattr(torch, _DTYPES[cfg.dtype]),
            use_safetensors=True,  # never unpickle weights
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from '{path}': {e}", hint=_hint(path)) from None
