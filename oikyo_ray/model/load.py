"""Load a base model and tokenizer from a hub id, local dir or s3:// prefix (Ray-free)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oikyo_ray.config import DEMO_MODEL, ModelConfig
from oikyo_ray.errors import ModelError
from oikyo_ray.model.chat_template import ensure_chat_template
from oikyo_ray.model.tiny import ensure_tiny_model
from oikyo_ray.storage import download_dir

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local dir or hub id that `from_pretrained` accepts; builds or fetches what it must."""
    if cfg.name_or_path == DEMO_MODEL:
        return str(ensure_tiny_model(cfg.cache_dir))
    if cfg.name_or_path.startswith("s3://"):
        dest = Path(cfg.cache_dir).expanduser() / "s3" / cfg.name_or_path[len("s3://") :].strip("/")
        return str(download_dir(cfg.name_or_path, dest))
    return cfg.name_or_path


def _check_local(path: str) -> None:
    """A path-like name that is not a directory is a typo, not a hub id: say so plainly."""
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise ModelError(
            f"model directory not found: {path}",
            hint="set model.name_or_path to a saved model dir, a hub id or an s3:// prefix",
        )


HINT = "check model.name_or_path; offline machines need a local dir or an s3:// copy"


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    path = path or resolve_model_path(cfg)
    _check_local(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer from '{path}': {e}", hint=HINT) from None
    ensure_chat_template(tok)
    return tok


def load_model(cfg: ModelConfig, path: str | None = None, quantization_config=None):
    """The base model from a local dir or resolved hub id; `quantization_config`: a qlora base."""
    path = path or resolve_model_path(cfg)
    _check_local(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=getattr(torch, _DTYPES[cfg.dtype]),
            use_safetensors=True,  # never unpickle weights
            **({"quantization_config": quantization_config} if quantization_config is not None else {}),
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from '{path}': {e}", hint=HINT) from None
