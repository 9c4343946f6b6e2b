"""Parallel strategies behind one small interface (Ray-free): local/DDP, FSDP2, DeepSpeed ZeRO.

    engine = build_engine(model, cfg, steps, world_size, device)
    engine.model(...)              forward (wrapped: DDP / fully_shard / DeepSpeed engine)
    engine.micro_step(loss, last)  backward of one micro-batch; on the last one of an optimizer
                                   step: clip, step, schedule, zero -> grad norm (else None), a
                                   0-d tensor or float: the loop reads it only when it reports
    engine.full_state()            collective: (model state, optimizer state), full, on every rank
    engine.load_optimizer(sd) / engine.scheduler
"""

from __future__ import annotations

import contextlib
import math

import torch

from oikyo_ray.config import OikyoConfig, TrainConfig


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
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
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TorchEngine:
    """A plain module (one process) or DDP (several); optimizer and schedule in torch."""

    name = "ddp"

    def __init__(self, model, cfg: TrainConfig, steps: int, device=None, wrap: bool = True):
        self.cfg, self.eval_model = cfg, model
        self.model = model
        if wrap and _dist_world() > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device] if device is not None and torch.device(device).type == "cuda" else None
            self.model = DDP(model, device_ids=ids)
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
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dev = torch.device(device) if device is not None else torch.device("cpu")
        mesh = init_device_mesh(dev.type, (_dist_world(),))
        for m in model.modules():
            if type(m).__name__.endswith(("DecoderLayer", "Block")):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        super().__init__(model, cfg, steps, device, wrap=False)

    def full_state(self):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # cpu_offload gathers onto rank 0 only; ranks > 0 get an empty dict (they do not write)
        return (get_model_state_dict(self.model, options=opts),
                get_optimizer_state_dict(self.model, self.optimizer, options=opts))

    def load_optimizer(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=sd,
                                 options=StateDictOptions(full_state_dict=True))


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 (optional CPU offload). Checkpoints carry the gathered weights, schedule,
    RNG and data position; the partitioned optimizer moments are not saved (a resume restarts them)."""

    name = "deepspeed"

    def __init__(self, model, cfg: OikyoConfig, steps: int, device=None):
        import deepspeed

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
            "optimizer": {"type": "AdamW", "params": {"lr": tc.lr, "weight_decay": tc.weight_decay,
                                                      "torch_adam": on_cpu}},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        params = [p for p in model.parameters() if p.requires_grad]
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, config=ds_cfg,
            lr_scheduler=lambda opt: build_scheduler(opt, tc, steps))
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

    def full_state(self):
        if self.model.zero_optimization_stage() == 3:
            sd = self.model._zero3_consolidated_16bit_state_dict() or {}
        else:
            sd = self.model.module.state_dict()
        return sd, None

    def load_optimizer(self, sd: dict) -> None:  # pragma: no cover - never saved
        pass


def build_engine(model, cfg: OikyoConfig, steps: int, device=None):
    s = cfg.scaling.strategy
    if s == "fsdp2" and _dist_world() > 1:
        return FSDP2Engine(model, cfg.train, steps, device)
    if s == "deepspeed":
        return DeepSpeedEngine(model, cfg, steps, device)
    return TorchEngine(model, cfg.train, steps, device)
