"""Private APIs of peft, deepspeed and lm-eval that oikyo relies on: when an upgrade moves one, this fails
first, naming the API, the installed version and the oikyo code that needs it (pyproject bounds
both packages at the versions tested)."""

import importlib
import importlib.metadata
import inspect

import pytest
import torch
from peft import LoraConfig, get_peft_model

# (module, dotted attribute, the oikyo code that uses it)
PRIVATE = [
    (
        "lm_eval",
        "lm_eval.tasks._yaml_loader",
        "load_yaml",
        "oikyo_ray/eval/harness.py (task YAMLs read with their includes; relative data_files made absolute)",
    ),
    (
        "peft",
        "peft.tuners.lora.layer",
        "Linear._mixed_batch_forward",
        "oikyo_ray/serve/multi_lora.py (batched mixed-adapter LoRA replaces it per layer)",
    ),
    (
        "peft",
        "peft.tuners.lora.layer",
        "VARIANT_KWARG_KEYS",
        "oikyo_ray/serve/multi_lora.py (variant kwargs kept off the base layer)",
    ),
    (
        "deepspeed",
        "deepspeed.runtime.engine",
        "DeepSpeedEngine._zero3_consolidated_16bit_state_dict",
        "oikyo_ray/train/engine.py (full weights gathered from ZeRO-3 for checkpoints)",
    ),
    (
        "deepspeed",
        "deepspeed.utils",
        "safe_get_full_optimizer_state",
        "oikyo_ray/train/engine.py (optimizer moments saved for exact resume)",
    ),
    (
        "deepspeed",
        "deepspeed.utils",
        "safe_set_full_optimizer_state",
        "oikyo_ray/train/engine.py (optimizer moments restored on resume)",
    ),
]


def _lookup(module: str, dotted: str):
    obj = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("dist,module,attr,used_by", PRIVATE, ids=[f"{m}.{a}" for _, m, a, _ in PRIVATE])
def test_private_api_is_present(dist, module, attr, used_by):
    version = importlib.metadata.version(dist)
    try:
        _lookup(module, attr)
    except (ImportError, AttributeError) as e:
        pytest.fail(
            f"{dist} {version} has no {module}.{attr} ({e}); {used_by} needs it: adapt that code "
            f"or pin {dist} below {version}"
        )


def test_peft_lora_layer_has_what_mixed_lora_reads():
    """MixedLoRA calls peft's forward with adapter_names and reads these per-layer attributes."""
    from peft.tuners.lora.layer import Linear

    params = inspect.signature(Linear._mixed_batch_forward).parameters
    assert "adapter_names" in params, f"peft {importlib.metadata.version('peft')}: _mixed_batch_forward{params}"
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    missing = [a for a in ("lora_A", "lora_B", "scaling", "lora_variant", "base_layer") if not hasattr(layer, a)]
    assert not missing, f"peft {importlib.metadata.version('peft')} LoRA Linear lacks {missing} (serve/multi_lora.py)"
