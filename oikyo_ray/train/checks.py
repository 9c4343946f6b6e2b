"""Errors a user can fix, raised on the driver before any worker starts (Ray-free)."""

from __future__ import annotations

from oikyo_ray.config import OikyoConfig
from oikyo_ray.errors import OikyoError
from oikyo_ray.model.methods import check_method
from oikyo_ray.train.steps import rows_per_worker, train_units


def check_before_ray(cfg: OikyoConfig) -> None:
    """What the config alone gets wrong."""
    check_method(cfg.method)
    if cfg.checkpoint.score and cfg.data.val_fraction == 0:
        raise OikyoError("checkpoint.score=val_loss needs a validation split", hint="set data.val_fraction > 0")
    if cfg.train.early_stopping_patience and cfg.data.val_fraction == 0:
        raise OikyoError("early stopping needs a validation split", hint="set data.val_fraction > 0")


def check_train_split(cfg: OikyoConfig, manifest: dict) -> None:
    """Every worker's shard holds at least one optimizer step."""
    tc, workers = cfg.train, cfg.scaling.num_workers
    if rows_per_worker(cfg, manifest) < tc.batch_size * tc.grad_accum:
        unit = "blocks" if cfg.data.packing else "rows"
        raise OikyoError(
            f"{train_units(cfg, manifest)} training {unit} across {workers} workers is less than one optimizer "
            f"step of train.batch_size={tc.batch_size} x train.grad_accum={tc.grad_accum} per worker",
            hint="add data, lower train.batch_size, train.grad_accum or scaling.num_workers",
        )


def has_val_split(cfg: OikyoConfig, manifest: dict) -> bool:
    """Whether every worker gets validation rows; an error when val_loss is needed and they do not."""
    n_val, workers = manifest["counts"]["val"], cfg.scaling.num_workers
    if n_val >= workers:
        return True
    if cfg.checkpoint.score or cfg.train.early_stopping_patience:
        raise OikyoError(
            f"{n_val} validation rows: too few for val_loss on {workers} workers",
            hint="raise data.val_fraction or turn off checkpoint.score / early stopping",
        )
    return False
