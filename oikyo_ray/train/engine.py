"""Parallel strategies behind one small interface (Ray-free): local/DDP, FSDP2, DeepSpeed ZeRO.

engine = build_engine(model, cfg, steps, world_size, device)
engine.model(...)              forward (wrapped: DDP / fully_shard / DeepSpeed engine)
engine.micro_step(loss, last)  backward of one micro-batch; on the last one of an optimizer
                               step: clip, step, schedule, zero -> grad norm (else None), a
                               0-d tensor or float: the loop reads it only when it reports
engine.full_state()            collective: (model state, optimizer state), full on rank 0
                               (other ranks may get empty dicts: only rank 0 writes)
engine.load_optimizer(sd) / engine.scheduler
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch._utils import _unflatten_dense_tensors
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from oikyo_ray.config import OikyoConfig, TrainConfig


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def lr_factor(cfg: TrainConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(opt, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total_steps))


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TorchEngine:
    """A plain module (one process) or DDP (several); optimizer and schedule in torch."""

    name = "ddp"

    def __init__(self, model, cfg: TrainConfig, steps: int, device=None, wrap: bool = True):
        self.cfg, self.eval_model = cfg, model
        self.model = model
        if wrap and _dist_world() > 1:
            ids = [device] if device is not None and torch.device(device).type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        self.device_type = torch.device(device).type if device is not None else "cpu"
        self._init_optim(steps)

    def _init_optim(self, steps: int) -> None:
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, steps)

    def autocast(self):
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, last: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-batch of a step."""
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def micro_step(self, loss, last: bool) -> torch.Tensor | None:
        (loss / self.cfg.grad_accum).backward()
        if not last:
            return None
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2

    def drop_partial(self) -> None:
        """An epoch ended inside an accumulation window: forget those gradients (resumable)."""
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_state(self) -> tuple[dict, dict | None]:
        return self.eval_model.state_dict(), self.optimizer.state_dict()

    def load_optimizer(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)


class FSDP2Engine(TorchEngine):
    """torch `fully_shard` per decoder layer and at the root, on a CPU or CUDA device mesh."""

    name = "fsdp2"

    def __init__(self, model, cfg: TrainConfig, steps: int, device=None):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        mesh = init_device_mesh(dev.type, (_dist_world(),))
        for m in model.modules():
            if type(m).__name__.endswith(("DecoderLayer", "Block")):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        super().__init__(model, cfg, steps, device, wrap=False)

    def full_state(self):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # cpu_offload gathers onto rank 0 only; ranks > 0 get an empty dict (they do not write)
        return (
            get_model_state_dict(self.model, options=opts),
            get_optimizer_state_dict(self.model, self.optimizer, options=opts),
        )

    def load_optimizer(self, sd: dict) -> None:
        set_optimizer_state_dict(
            self.model, self.optimizer, optim_state_dict=sd, options=StateDictOptions(full_state_dict=True)
        )


def _stepped_tensors(opt) -> list[torch.Tensor]:
    """The tensors DeepSpeed's base optimizer steps, which key its state: ZeRO-3's flat fp32
    partitions (its param groups are empty between steps); else those of its param groups."""
    flats = getattr(opt, "fp32_partitioned_groups_flat", None)
    return flats if flats is not None else [p for g in opt.param_groups for p in g["params"]]


def _partitioned(p) -> bool:
    """Whether DeepSpeed's safe_{get,set}_full_optimizer_state reach p (ZeRO-1/2/3: linked to its
    partitions); under ZeRO-0 they find nothing (get returns None)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _replicated_moments(opt, key: str) -> dict:
    """ZeRO-0: parameter -> a view of its moment `key`. DeepSpeed steps the parameters themselves
    (fp32), an fp32 copy of each (bf16, torch optimizers) or one flat fp32 copy per group (bf16,
    fused optimizers), in the parameters' order."""
    views: dict[torch.Tensor, torch.Tensor] = {}
    lp_groups = getattr(opt, "fp16_groups", None) or [g["params"] for g in opt.param_groups]
    for g, ps in zip(opt.param_groups, lp_groups):
        stepped = [opt.state[t][key] for t in g["params"]]
        if len(stepped) < len(ps):
            stepped = _unflatten_dense_tensors(stepped[0], ps)
        views.update((p, s.view_as(p)) for p, s in zip(ps, stepped))
    return views


def _copy(v):
    """A tensor of its own (steps are counted in place, and safetensors refuses shared storage)."""
    return v.detach().clone() if torch.is_tensor(v) else v


def _is_moment(v) -> bool:
    """exp_avg-like state (shaped like its parameter), as opposed to a step count."""
    return torch.is_tensor(v) and v.ndim > 0


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 (optional CPU offload). Checkpoints carry the gathered weights, the full
    optimizer state (moments per parameter name, whatever the partitioning), schedule, RNG and data
    position: a resume continues exactly where the run stopped."""

    name = "deepspeed"

    def __init__(self, model, cfg: OikyoConfig, steps: int, device=None):
        import deepspeed  # noqa: PLC0415 (heavy, and only scaling.strategy=deepspeed needs it)

        tc, sc = cfg.train, cfg.scaling
        self.cfg = tc
        on_cpu = device is None or torch.device(device).type == "cpu"
        zero: dict = {"stage": sc.zero_stage}
        if sc.offload_optimizer and sc.zero_stage > 0:
            zero["offload_optimizer"] = {"device": "cpu"}
        if sc.offload_params and sc.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
        if sc.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        ds_cfg = {
            "train_micro_batch_size_per_gpu": tc.batch_size,
            "gradient_accumulation_steps": tc.grad_accum,
            "gradient_clipping": tc.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": tc.mixed_precision == "bf16"},
            # DeepSpeed's CPU Adam JIT-compiles (~1 min); torch's AdamW is as fast for adapters
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": tc.lr, "weight_decay": tc.weight_decay, "torch_adam": on_cpu},
            },
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        params = [p for p in model.parameters() if p.requires_grad]
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=params,
            config=ds_cfg,
            lr_scheduler=lambda opt: build_scheduler(opt, tc, steps),
        )
        self.eval_model = self.model

    def autocast(self):
        return contextlib.nullcontext()

    def no_sync(self, last: bool):
        return contextlib.nullcontext()

    def micro_step(self, loss, last: bool) -> float | None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        self.model.step()
        if not last:
            return None
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def drop_partial(self) -> None:
        self.model.zero_grad()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.module.named_parameters() if p.requires_grad]

    def _whole_moments(self, moments: list[str], params: list) -> dict:
        """ZeRO-0, where every rank holds whole moments: key -> parameter -> a view of its moment;
        {} under ZeRO-1/2/3, where DeepSpeed's helpers gather and scatter them by parameter."""
        if _partitioned(params[0][1]):
            return {}
        return {k: _replicated_moments(self.optimizer, k) for k in moments}

    def full_state(self):
        """Collective: every rank gathers the weights and each parameter's moments in one order;
        only rank 0 keeps them (the others get empty dicts: they do not write)."""
        if self.model.zero_optimization_stage() == 3:
            sd = self.model._zero3_consolidated_16bit_state_dict() or {}
        else:
            sd = self.model.module.state_dict()
        return sd, self._full_optimizer_state()

    def _full_optimizer_state(self) -> dict | None:
        from deepspeed.utils import safe_get_full_optimizer_state  # noqa: PLC0415 (as in __init__)

        opt, params = self.optimizer, self._trainable()
        first = opt.state.get(_stepped_tensors(opt)[0])
        if not first:  # no step taken yet: nothing to save
            return None
        moments = sorted(k for k, v in first.items() if _is_moment(v))
        whole = self._whole_moments(moments, params)
        keep = self.model.global_rank == 0
        state = {}
        for name, p in params:
            full = {k: _copy(v) for k, v in first.items() if k not in moments}  # the step count
            for k in moments:  # partitioned: gathered (a collective, in the same order on all ranks)
                full[k] = (_copy(whole[k][p]) if whole else safe_get_full_optimizer_state(p, k)).cpu()
            if keep:
                state[name] = full
        # the engine hands DeepSpeed one list of parameters: one param group holds them all
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(state)} for g in opt.param_groups]
        return {"state": state, "param_groups": groups} if keep else {}

    def load_optimizer(self, sd: dict) -> None:
        """Each rank takes its own partition of every parameter's moments from the full state (under
        ZeRO-0 all of them). The base optimizer's state is created first, as DeepSpeed's first step
        would (with the saved step count), and linked to the parameters' fragments; the param
        groups get back the lr the schedule had reached."""
        from deepspeed.utils import safe_set_full_optimizer_state  # noqa: PLC0415 (as in __init__)

        opt, params = self.optimizer, self._trainable()
        saved = next(iter(sd["state"].values()))
        moments = [k for k, v in saved.items() if _is_moment(v)]
        for t in _stepped_tensors(opt):
            opt.state[t] = {k: torch.zeros_like(t) if k in moments else _copy(v) for k, v in saved.items()}
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: per-parameter views
            opt._lazy_init_hp_params_optimizer_state()
        whole = self._whole_moments(moments, params)
        for name, p in params:
            for k in moments:
                v = sd["state"][name][k]
                if whole:
                    whole[k][p].copy_(v)
                else:
                    safe_set_full_optimizer_state(p, v, k)
        for g, s in zip(opt.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in s.items() if k != "params"})


def build_engine(model, cfg: OikyoConfig, steps: int, device=None):
    s = cfg.scaling.strategy
    if s == "fsdp2" and _dist_world() > 1:
        return FSDP2Engine(model, cfg.train, steps, device)
    if s == "deepspeed":
        return DeepSpeedEngine(model, cfg, steps, device)
    return TorchEngine(model, cfg.train, steps, device)
