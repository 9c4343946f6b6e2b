"""Mixed-adapter batches in two batched matmuls per LoRA layer (Ray-free; the Punica/S-LoRA idea
in plain torch).

peft runs a mixed batch (`generate(..., adapter_names=[...])`) as one sub-batch per adapter in
every LoRA layer: with 8 adapters in a batch of 8 that is 8 gathers, 16 small matmuls and 8
scatters per layer and step, so throughput falls as traffic mixes. `MixedLoRA` keeps each layer's
adapters stacked (A: [n+1, r, in], B: [n+1, out, r], rank zero-padded, slot 0 = no adapter) and
runs any mix of rows as  base(x) + bmm(bmm(x, A[idx]^T), B[idx]^T) * scale[idx]  whatever the
number of adapters. Zero-padded ranks and the empty slot add exact zeros, so outputs equal peft's.

Plain LoRA on Linear layers in eval mode only; a layer with DoRA or another variant, a LoRA bias,
or a model in training mode goes through peft's own `_mixed_batch_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, Linear


@dataclass
class _Stack:
    version: int
    index: dict  # adapter name -> slot (1..n); unknown names and "__base__" use slot 0
    A: torch.Tensor | None  # None: a layer this path does not handle (peft's path runs)
    B: torch.Tensor | None
    scale: torch.Tensor | None
    # a batch's row -> slot tensor, per adapter_names and device: built once per batch, not per
    # decoding step (on GPU each build is a host-to-device copy)
    rows: dict = field(default_factory=dict)

    def slots(self, adapter_names: list[str], device) -> torch.Tensor:
        key = (tuple(adapter_names), device)
        if key not in self.rows:
            if len(self.rows) >= 64:
                self.rows.clear()
            self.rows[key] = torch.tensor([self.index.get(n, 0) for n in adapter_names], device=device)
        return self.rows[key]


class MixedLoRA:
    """Installed on a PeftModel's LoRA Linear layers; call `changed()` whenever adapters are
    loaded or deleted (stacks are rebuilt lazily, once per layer)."""

    def __init__(self) -> None:
        self.version = 0
        self.variant_keys: tuple = ()  # peft's per-variant forward kwargs (set by install)

    def install(self, model) -> None:
        """Route the mixed-batch forward of every (new) LoRA Linear layer of `model` through here."""
        self.variant_keys = tuple(VARIANT_KWARG_KEYS)
        for m in model.modules():
            if isinstance(m, Linear) and "_oikyo_peft_mixed" not in m.__dict__:
                # instance attributes (as nn.Module's setattr would store them) shadow peft's method
                m.__dict__["_oikyo_peft_mixed"] = m._mixed_batch_forward  # peft's, bound to m
                m.__dict__["_mixed_batch_forward"] = partial(self._forward, m)
        self.changed()

    def changed(self) -> None:
        self.version += 1

    def _stack(self, m) -> _Stack:
        st = m.__dict__.get("_oikyo_stack")
        if st is not None and st.version == self.version:
            return st
        names = list(m.lora_A.keys())
        plain = names and not any(n in m.lora_variant or m.lora_B[n].bias is not None for n in names)
        if not plain:
            st = _Stack(self.version, {}, None, None, None)
        else:
            w = m.lora_A[names[0]].weight
            r = max(m.lora_A[n].weight.shape[0] for n in names)
            out = m.lora_B[names[0]].weight.shape[0]
            A = torch.zeros(len(names) + 1, r, w.shape[1], dtype=w.dtype, device=w.device)
            B = torch.zeros(len(names) + 1, out, r, dtype=w.dtype, device=w.device)
            scale = torch.zeros(len(names) + 1, dtype=w.dtype, device=w.device)
            for i, n in enumerate(names, start=1):
                k = m.lora_A[n].weight.shape[0]
                A[i, :k] = m.lora_A[n].weight.detach()
                B[i, :, :k] = m.lora_B[n].weight.detach()
                scale[i] = m.scaling[n]
            st = _Stack(self.version, {n: i for i, n in enumerate(names, start=1)}, A, B, scale)
        m._oikyo_stack = st
        return st

    def _forward(self, m, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        st = self._stack(m)
        variant = {k: kwargs.pop(k) for k in self.variant_keys if k in kwargs}  # not for base_layer
        if (
            st.A is None
            or st.B is None
            or st.scale is None
            or m.training
            or x.dim() != 3
            or any(v is not None for v in variant.values())
        ):
            return m._oikyo_peft_mixed(x, *args, adapter_names=adapter_names, **kwargs, **variant)
        result = m.base_layer(x, *args, **kwargs)
        idx = st.slots(adapter_names, x.device)
        h = torch.bmm(x.to(st.A.dtype), st.A[idx].transpose(1, 2))
        y = torch.bmm(h, st.B[idx].transpose(1, 2)) * st.scale[idx][:, None, None]
        return result + y.to(result.dtype)
