"""Fine-tuning methods: wrap a base model for full, LoRA, DoRA or QLoRA training (Ray-free)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from oikyo_ray.config import MethodConfig
from oikyo_ray.model.qlora import compute_dtype, keep_trainable, require_bitsandbytes


def check_method(method: MethodConfig) -> None:
    """Refuse what cannot train correctly, before Ray starts. qlora runs on CPU too (bitsandbytes'
    CPU backend), guarded by qlora.keep_trainable in apply_method."""
    if method.type != "qlora":
        return
    require_bitsandbytes()


def quantization_config(method: MethodConfig, use_gpu: bool | None = None):
    """The transformers BitsAndBytesConfig for loading a qlora base (None for other methods);
    compute dtype bf16 on GPU, float32 on CPU (use_gpu None: whether CUDA is available)."""
    if method.type != "qlora":
        return None
    gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(gpu),
    )


def apply_method(model, method: MethodConfig, gradient_checkpointing: bool = False):
    """Return the model to train: the base itself (full) or a peft model with a fresh adapter."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if method.type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.type == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = method.lora
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        use_dora=method.type == "dora",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    if method.type == "qlora":  # bnb's CPU eval repack would cut the LoRA gradients (qlora.py)
        keep_trainable(model)
    return model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total
