"""Fine-tuning methods: wrap a base model for full, LoRA, DoRA or QLoRA training (Ray-free)."""

from __future__ import annotations

from oikyo_ray.config import MethodConfig
from oikyo_ray.errors import ModelError

QLORA_CPU = ("qlora needs a CUDA GPU (scaling.use_gpu=true) and bitsandbytes: on CPU the bitsandbytes "
             "4-bit kernels repack the weights after any no-grad eval forward and the LoRA gradients "
             "silently become None, so training would stop learning")


def check_method(method: MethodConfig, use_gpu: bool) -> None:
    """Refuse what cannot train correctly, before Ray starts."""
    if method.type != "qlora":
        return
    if not use_gpu:
        raise ModelError(QLORA_CPU, hint="use method.type=lora on CPU, or run on GPUs")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("qlora needs bitsandbytes", hint="pip install bitsandbytes") from None


def quantization_config(method: MethodConfig):
    """The transformers BitsAndBytesConfig for loading a qlora base (None for other methods)."""
    if method.type != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.quant_type,
                              bnb_4bit_use_double_quant=method.double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def apply_method(model, method: MethodConfig, gradient_checkpointing: bool = False):
    """Return the model to train: the base itself (full) or a peft model with a fresh adapter."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if method.type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
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
    return get_peft_model(model, peft_cfg)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total
