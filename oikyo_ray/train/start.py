"""How a worker starts (Ray-free): seeded random generators and the model to train, with the
weights of the checkpoint it resumes from."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from oikyo_ray.config import OikyoConfig
from oikyo_ray.model.load import load_model
from oikyo_ray.model.methods import apply_method, quantization_config
from oikyo_ray.runs import store
from oikyo_ray.train.checkpoint import load_weights


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model_to_train(cfg: OikyoConfig, model_path: str, ckpt_dir: Path | None = None):
    """The base model with the method applied; with `ckpt_dir`, that checkpoint's weights restored
    (the whole model for method full, else the adapter), before any strategy wraps it; a fresh
    adapter starts from method.init_adapter's weights when set."""
    base = load_model(cfg.model, model_path, quantization_config(cfg.method, cfg.scaling.use_gpu))
    model = apply_method(base, cfg.method, cfg.train.gradient_checkpointing)
    if cfg.method.init_adapter and ckpt_dir is None:
        load_init_adapter(model, cfg.method.init_adapter)
    if ckpt_dir is not None:
        load_weights(model, ckpt_dir, full=cfg.method.type == "full")
    return model


def load_init_adapter(model, where: str) -> None:
    """The weights of a saved adapter (local or s3://) into the fresh one (shapes checked on the
    driver: train.checks.check_init_adapter)."""
    if not store.is_remote(where):
        load_weights(model, Path(where), full=False)
        return
    with tempfile.TemporaryDirectory() as tmp:
        load_weights(model, store.download(where, Path(tmp)), full=False)
