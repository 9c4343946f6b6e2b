"""Errors a user can fix, raised on the driver before any worker starts (Ray-free)."""

from __future__ import annotations

import json

from oikyo_ray.config import PAIRWISE, PREFERENCE, MethodConfig, OikyoConfig
from oikyo_ray.errors import OikyoError
from oikyo_ray.model.methods import check_method
from oikyo_ray.runs import store
from oikyo_ray.train.steps import rows_per_worker, train_units

TRAINED_OBJECTIVES = ("sft", *PREFERENCE)  # objectives ray_train.fit runs (config.Objective lists all)


def check_before_ray(cfg: OikyoConfig) -> None:
    """What the config alone gets wrong."""
    check_method(cfg.method)
    check_init_adapter(cfg.method)
    if cfg.method.objective not in TRAINED_OBJECTIVES:
        raise OikyoError(
            f"method.objective={cfg.method.objective} runs in the Ray-free loop (train/objective.py) but not "
            "on Ray Train yet",
            hint=f"use method.objective {' or '.join(TRAINED_OBJECTIVES)}",
        )
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


def check_objective_data(cfg: OikyoConfig, manifest: dict) -> None:
    """Every kept row fits method.objective: pairwise objectives need a `rejected` answer on every
    row, kto a `label` (or a pair, trained as one desirable and one undesirable completion); the
    error names the files that do not fit (counts from the manifest's inputs)."""
    objective = cfg.method.objective
    if objective == "sft":
        return
    bad, usable = [], 0
    need = "preference pairs (chosen + rejected)" if objective in PAIRWISE else "rows with a desirable label"
    for i in manifest["inputs"]:
        kept, pairs, labelled = i["accepted"], i.get("preference", 0), i.get("labelled", 0)
        if objective in PAIRWISE and pairs < kept:
            bad.append(f"{i['path']}: {kept - pairs} of {kept} kept rows have no 'rejected' answer")
        elif objective == "kto" and kept not in (pairs, labelled):
            bad.append(f"{i['path']}: {kept - labelled} of {kept} kept rows have no 'label' (and are not pairs)")
        usable += kept - i.get("no_room", 0)
    if bad:
        raise OikyoError(
            f"method.objective={objective} trains on {need}, which these files of data.paths do not hold:\n  "
            + "\n  ".join(bad),
            hint="point data.paths at preference data, or use method.objective=sft",
        )
    if usable <= 0:
        raise OikyoError(
            f"method.objective={objective}: no kept row leaves room for its answers within "
            f"data.max_length={cfg.data.max_length} (the prompts are longer)",
            hint="raise data.max_length",
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


def check_init_adapter(method: MethodConfig) -> None:
    """method.init_adapter is an adapter whose shape is the one this run trains: its weights load
    into the fresh adapter one for one (a rank or module mismatch would fail in every worker)."""
    if not method.init_adapter:
        return
    where = method.init_adapter
    text = store.read_text(store.join(where, "adapter_config.json"))
    if text is None or not store.exists(store.join(where, "adapter_model.safetensors")):
        raise OikyoError(
            f"method.init_adapter={where}: no adapter_config.json and adapter_model.safetensors there",
            hint="point it at a finished run's adapter/ directory",
        )
    saved, lora = json.loads(text), method.lora
    # field -> (the adapter's, this run's)
    pairs: dict[str, tuple[object, object]] = {
        "method.lora.r": (saved.get("r"), lora.r),
        "method.lora.alpha": (saved.get("lora_alpha"), lora.alpha),
        "method.type": ("dora" if saved.get("use_dora") else "lora", "dora" if method.type == "dora" else "lora"),
    }
    targets = saved.get("target_modules")
    # peft writes "all-linear" resolved to module names: names are compared only when both list them
    if isinstance(lora.target_modules, list) and isinstance(targets, list):
        pairs["method.lora.target_modules"] = (sorted(targets), sorted(lora.target_modules))
    wrong = [f"{k}: the adapter has {a!r}, this run {b!r}" for k, (a, b) in pairs.items() if a != b]
    if wrong:
        raise OikyoError(
            f"method.init_adapter={where} does not fit this run's adapter: " + "; ".join(wrong),
            hint="set those fields as the adapter was trained (its adapter_config.json)",
        )
