"""Checkpoint directories (Ray-free): everything an exact resume needs, nothing pickled.

adapter_model.safetensors + adapter_config.json   (lora/dora/qlora)  or  model*.safetensors (full)
tokenizer files
optimizer.safetensors    optimizer moments; param groups and non-tensor state in the header
rng.safetensors          torch (and CUDA) generator states
trainer_state.json       step, epoch, data position, schedule, numpy/python RNG, early stopping;
                         written last: a directory without it is incomplete and never loaded
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STATE = "trainer_state.json"
OPTIM = "optimizer.safetensors"
RNG = "rng.safetensors"
TRAINING_ONLY = (OPTIM, RNG)  # dropped from the final adapter/model directory


@dataclass
class TrainState:
    """Where the loop is: restored on resume so the run continues as if never stopped."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches consumed in `epoch` (the data position)
    best_val: float = float("inf")
    best_step: int = 0
    bad_evals: int = 0  # validations in a row without improvement (early stopping)
    stopped_early: bool = False
    resumed_from: int | None = None
    scheduler: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)


# -- optimizer state <-> safetensors (tensors by name, the rest as JSON in the header) ------------


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars, keys = {}, {}, []
    for i, (pid, st) in enumerate(sd.get("state", {}).items()):
        keys.append(pid)
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{name}"] = v
    return tensors, {"keys": keys, "scalars": scalars, "param_groups": sd.get("param_groups", [])}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {pid: {} for pid in meta["keys"]}
    for flat, v in list(tensors.items()) + list(meta["scalars"].items()):
        i, name = flat.split(".", 1)
        state[meta["keys"][int(i)]][name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_optimizer(sd: dict, path: Path) -> None:
    tensors, meta = _flatten_optimizer(sd)
    save_file(tensors, str(path), metadata={"oikyo": json.dumps(meta)})


def load_optimizer(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["oikyo"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return _unflatten_optimizer(tensors, meta)


# -- RNG -------------------------------------------------------------------------------------------


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    np_state = cast(tuple, np.random.get_state(legacy=True))  # the tuple form, never a dict
    py = random.getstate()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": [py[0], list(py[1]), py[2]]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    if meta:
        n = meta["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
        p = meta["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# -- whole directories -----------------------------------------------------------------------------


def write_checkpoint(
    out: Path, model, model_sd: dict, optim_sd: dict | None, state: TrainState, tokenizer=None
) -> None:
    """Write a complete checkpoint into `out` (a fresh temp dir; Ray persists it afterwards).
    `model` is the unwrapped (peft or HF) model; `model_sd` its full state dict."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=model_sd, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if optim_sd is not None:
        save_optimizer(optim_sd, out / OPTIM)
    rng_meta, rng_tensors = capture_rng()
    save_file(rng_tensors, str(out / RNG))
    state.rng = rng_meta
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    tmp.rename(out / STATE)  # last: marks the directory complete


def read_state(ckpt: Path) -> TrainState:
    p = ckpt / STATE
    if not p.is_file():
        raise FileNotFoundError(f"incomplete checkpoint (no {STATE}): {ckpt}")
    return TrainState(**json.loads(p.read_text()))


def load_weights(model, ckpt: Path, full: bool) -> None:
    """Load the checkpoint's weights into an unwrapped model (before DDP/FSDP/DeepSpeed wrap it)."""
    if not full:
        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        return
    sd = {}
    for f in sorted(ckpt.glob("model*.safetensors")):
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if "lm_head" in k} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def restore(engine, ckpt: Path) -> TrainState:
    """Optimizer, schedule and RNG from `ckpt` into `engine`; the returned state resumes the loop."""
    state = read_state(ckpt)
    if (ckpt / OPTIM).is_file():
        engine.load_optimizer(load_optimizer(ckpt / OPTIM))
    if state.scheduler:
        engine.scheduler.load_state_dict(state.scheduler)
    restore_rng(state.rng, load_file(str(ckpt / RNG)) if (ckpt / RNG).is_file() else {})
    state.resumed_from = state.step
    return state


# -- the run's result -----------------------------------------------------------------------------

C = TypeVar("C")


def choose_final(final: str, kept: Iterable[tuple[C, dict | None]], last: C | None) -> C | None:
    """The checkpoint that becomes the run's adapter/model: for checkpoint.final=best the kept one
    (checkpoint, its metrics) with the lowest val_loss, else, or when none has one, the last."""
    if final == "best":
        scored = [(m["val_loss"], c) for c, m in kept if m and "val_loss" in m]
        if scored:
            return min(scored, key=lambda t: t[0])[1]
    return last


def drop_training_state(final_dir: Path) -> None:
    """Remove what only a resume needs (optimizer, RNG) from a final adapter/model directory."""
    for name in TRAINING_ONLY:
        (final_dir / name).unlink(missing_ok=True)
