"""Full fine-tuning vs PEFT: the table's counts by hand, each method's config, what cannot run
skipped with its reason, and `oikyo compare-methods` end to end on a real local Ray."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from oikyo_ray.cli import main
from oikyo_ray.config import load_config
from oikyo_ray.demo.run import DEMO_CONFIG
from oikyo_ray.errors import ConfigError
from oikyo_ray.methods.table import markdown, saved_values
from tests.conftest import SHORT_DEMO_RUN


def test_trainable_values_are_counted_from_the_saved_weights(tmp_path):
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, tmp_path / "adapter_model.safetensors")
    save_file({"c": torch.zeros(5, 1)}, tmp_path / "more.safetensors")
    (tmp_path / "adapter_config.json").write_text("{}")
    assert saved_values(tmp_path) == 2 * 3 + 4 + 5


def test_each_method_gets_its_config_and_what_cannot_run_is_skipped(monkeypatch):
    from oikyo_ray.methods.ray_methods import method_configs

    cfg = load_config(DEMO_CONFIG, ["compare_methods.lr={full: 0.0001}"])
    variants, skipped = method_configs(cfg)
    assert list(variants) == ["full", "lora", "dora", "qlora"] and skipped == {}
    assert [v.method.type for v in variants.values()] == ["full", "lora", "dora", "qlora"]
    assert variants["full"].train.lr == 0.0001 and variants["lora"].train.lr == cfg.train.lr
    assert variants["dora"].data == cfg.data and variants["dora"].train.max_steps == cfg.train.max_steps

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # a machine without it: import fails
    variants, skipped = method_configs(cfg)
    assert "qlora" not in variants and "bitsandbytes" in skipped["qlora"]
    assert "| qlora | skipped: method.type=qlora needs bitsandbytes" in markdown([], skipped)
    with pytest.raises(ConfigError, match="none can run here"):
        method_configs(load_config(DEMO_CONFIG, ["compare_methods.methods=[qlora]"]))


def test_bad_compare_settings_fail_before_ray(capsys):
    with pytest.raises(ConfigError, match=r"compare_methods\.methods"):
        load_config(DEMO_CONFIG, ["compare_methods.methods=[lora, lora]"])
    with pytest.raises(ConfigError, match=r"compare_methods\.methods"):
        load_config(DEMO_CONFIG, ["compare_methods.methods=[prefix_tuning]"])
    assert main(["compare-methods", str(DEMO_CONFIG), "eval.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert "eval.enabled" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.ray
def test_compare_methods_full_vs_lora_table(ray_session, base_overrides, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    args = [
        "compare-methods",
        str(DEMO_CONFIG),
        *base_overrides,
        "run.name=methods",
        "compare_methods.methods=[full, lora]",
        "compare_methods.lr={full: 0.0005}",
        *SHORT_DEMO_RUN,
    ]
    assert main(args) == 0
    out = tmp_path / "runs" / "methods"
    got = json.loads((out / "methods.json").read_text())
    full, lora = got["methods"]
    assert (full["method"], lora["method"], got["skipped"]) == ("full", "lora", {})
    assert full["trainable_params"] == AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 2
    assert full["artifact_mb"] > lora["artifact_mb"] > 0
    for row in (full, lora):
        assert row["test_loss"] > 0 and row["tokens_per_s"] > 0 and row["peak_mem_mb"] > 0 and row["train_seconds"] > 0
        assert row["quality_metric"] == "exact_match" and row["test_loss_delta"] < 0  # both learnt something
        assert (out / row["method"] / "eval" / "report.json").is_file()
    assert "lr: 0.0005" in (out / "full" / "config.yaml").read_text()
    table = (out / "methods.md").read_text()
    assert table.startswith("| method | test_loss |") and "| full |" in table and "| lora |" in table
    assert (out / "methods.png").stat().st_size > 1000
