"""QLoRA with bitsandbytes on CPU as well as GPU (Ray-free): keep a 4-bit base trainable after eval.

bitsandbytes' CPU backend (0.50) speeds up inference in place: `Linear4bit.forward` in eval mode,
on an input that needs no grad, on a CPU with AVX512-BF16, repacks its weight into the layout of a
bf16 inference kernel (`quant_state.packing_format_for_cpu`). The repack is never undone, and every
later forward, training ones too, runs that kernel (`gemv_4bit`), which has no autograd: gradients
stop at each 4-bit layer, the LoRA weights behind one get None (or partial) gradients and the loss
stops moving, with only a UserWarning. The repack also fails on layers whose output size is not a
multiple of 32. `keep_trainable` turns the repack off and undoes any that happened anyway.
"""

from __future__ import annotations

import torch

from oikyo_ray.errors import ModelError

HINT = "pip install bitsandbytes (or pip install -e '.[qlora]'), or use method.type=lora"


def require_bitsandbytes() -> None:
    """qlora loads its base through bitsandbytes: say so before Ray starts, not in a worker."""
    try:
        import bitsandbytes  # noqa: F401, PLC0415  (optional: only qlora needs it)
    except ImportError:
        raise ModelError("method.type=qlora needs bitsandbytes, which is not installed", hint=HINT) from None


def compute_dtype(use_gpu: bool):
    """Matmul dtype of the 4-bit layers: bf16 on GPU; float32 on CPU, exact and fast on any CPU
    (bf16 matmuls are only fast with AVX512-BF16/AMX; train.mixed_precision=bf16 still autocasts)."""
    return torch.bfloat16 if use_gpu else torch.float32


def _linear4bit_layers(model):
    import bitsandbytes as bnb  # noqa: PLC0415  (optional: only qlora needs it)

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def is_packed(layer) -> bool:
    """Whether bnb repacked this layer's weight for its CPU inference kernel (no autograd)."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def unpack(layer) -> None:
    """Undo the CPU inference repack (bnb's own inverse, as it does before `.cuda()` or saving)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # noqa: PLC0415  (optional)

    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
        layer.weight.data, layer.weight.quant_state
    )
    layer.quant_state = layer.weight.quant_state


def _unpack_before_grad_forward(layer, args) -> None:
    """Forward pre-hook: a forward that builds a graph must not run on the repacked layout."""
    if torch.is_grad_enabled() and is_packed(layer):
        try:
            unpack(layer)
        except Exception as e:  # a bnb without the inverse: stop rather than train on None grads
            raise ModelError(
                f"bitsandbytes repacked a 4-bit layer for CPU inference and it cannot be "
                f"undone ({e}): its LoRA gradients would silently be None",
                hint="use method.type=lora on CPU, or another bitsandbytes version",
            ) from None


def keep_trainable(model):
    """Guard a 4-bit model for training: turn off bnb's CPU repack (the per-layer switch its
    forward reads), undo any repack already done, and unpack again before any grad-enabled
    forward should a bnb version repack anyway. Eval forwards then use the training kernels
    (slower than the inference kernel, but correct). Returns the model."""
    for layer in _linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False
        if is_packed(layer):
            unpack(layer)
        if not getattr(layer, "_oikyo_guarded", False):
            layer.register_forward_pre_hook(_unpack_before_grad_forward)
            layer._oikyo_guarded = True
    return model
