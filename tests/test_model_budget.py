"""model.max_serve_memory_gb: the serving memory estimate (weights counted exactly on the meta
device, KV cache from the config) and the refusal before training, naming the field."""

import pytest

from oikyo_ray.cli import main
from oikyo_ray.config import load_config
from oikyo_ray.demo.run import DEMO_CONFIG
from oikyo_ray.errors import ConfigError
from oikyo_ray.model.budget import GB, check_serve_memory, serve_memory


def test_estimate_counts_the_real_weights_and_the_kv_cache(tiny_model, cache_dir):
    from transformers import AutoConfig

    from oikyo_ray.model.load import load_model

    cfg = load_config(None, [f"model.cache_dir={cache_dir}", "serve.max_batch_size=4", "data.max_length=100"])
    m = serve_memory(cfg, str(tiny_model))
    real = sum(p.numel() for p in load_model(cfg.model, str(tiny_model)).parameters())
    assert m["params"] == real and m["weights_gb"] == pytest.approx(real * 4 / GB)
    c = AutoConfig.from_pretrained(str(tiny_model))
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert m["kv_cache_gb"] == pytest.approx(per_token * 4 * (100 + cfg.serve.max_tokens_limit) / GB)
    half = serve_memory(load_config(None, [f"model.cache_dir={cache_dir}", "model.dtype=bfloat16"]), str(tiny_model))
    assert half["weights_gb"] == pytest.approx(m["weights_gb"] / 2)


def test_over_budget_is_refused_before_training(tiny_model, cache_dir, tmp_path, capsys):
    cfg = load_config(None, [f"model.cache_dir={cache_dir}", "model.max_serve_memory_gb=0.000001"])
    with pytest.raises(ConfigError, match=r"over model\.max_serve_memory_gb=1e-06"):
        check_serve_memory(cfg, str(tiny_model))
    assert check_serve_memory(load_config(None, [f"model.cache_dir={cache_dir}"]), str(tiny_model)) is None
    roomy = load_config(None, [f"model.cache_dir={cache_dir}", "model.max_serve_memory_gb=80"])
    assert check_serve_memory(roomy, str(tiny_model))["total_gb"] < 80
    root = tmp_path / "runs"
    args = [f"model.cache_dir={cache_dir}", f"run.root={root}", "model.max_serve_memory_gb=0.000001"]
    assert main(["finetune", str(DEMO_CONFIG), *args]) == 2
    assert "model.max_serve_memory_gb" in capsys.readouterr().err and not root.exists()  # no run, no Ray
