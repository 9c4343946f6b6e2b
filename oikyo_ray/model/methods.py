"""Fine-tuning methods: wrap a base model for full, LoRA or DoRA training (Ray-free)."""

from __future__ import annotations

from oikyo_ray.config import MethodConfig


def apply_method(model, method: MethodConfig):
    """Return the model to train: the base itself (full) or a peft model with a fresh adapter."""
    if method.type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = method.lora
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=method.type == "dora",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total
