"""Config: shipped YAMLs validate; bad keys, types and overrides fail naming the field."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oikyo_ray.config import OikyoConfig, apply_overrides, describe_fields, load_config
from oikyo_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = (
    sorted(ROOT.glob("jobs/configs/*.yaml"))
    + sorted(ROOT.glob("oikyo_ray/configs/*.yaml"))
    + [ROOT / "serve/serve_demo.yaml"]
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, OikyoConfig)
    # configs open with the command that runs them (torchtune style)
    assert "Run as:" in path.read_text().splitlines()[1] or "Run as:" in path.read_text()[:400]


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "scaling.num_workers=1",
            "data.paths=[a.json, b.jsonl]",
            "method.lora.target_modules=[q_proj, v_proj]",
            "serve.adapters.x=/a",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.scaling.num_workers == 1
    assert cfg.data.paths == ["a.json", "b.jsonl"]
    assert cfg.method.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.serve.adapters == {"x": "/a"}


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lrr=1", "train.lrr"),  # unknown key
        ("train.lr=fast", "train.lr"),  # wrong type
        ("train.epochs=0", "train.epochs"),  # out of range
        ("method.type=qlorax", "method.type"),  # not a choice
        ("bogus.key=1", "bogus"),  # unknown section
        ("run.name=../escape", "run.name"),  # names cannot escape the runs root
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


@pytest.mark.parametrize("override", ["noequals", "=1", "a..b=1"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError, match="override"):
        load_config(None, [override])


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=2"])


def test_yaml_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"train": {"learning_rate": 1}}))
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown field"):
        load_config(unknown)


def test_auth_can_be_off_only_on_loopback():
    assert load_config(None, ["serve.auth=false"]).serve.auth is False
    with pytest.raises(ConfigError, match="loopback|127.0.0.1"):
        load_config(None, ["serve.auth=false", "serve.host=0.0.0.0"])


def test_every_field_is_described():
    lines = describe_fields()
    assert len(lines) > 30
    assert all("# None" not in line for line in lines), [line for line in lines if "# None" in line]


def test_config_hash_ignores_run_location():
    a = load_config(None, ["run.root=/a", "run.name=x"])
    b = load_config(None, ["run.root=/b", "run.name=y"])
    c = load_config(None, ["train.lr=0.1"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_cli_reports_bad_config_without_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "oikyo_ray.cli", "config", "train.lrr=1"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert "train.lrr: unknown field" in r.stderr and "Traceback" not in r.stderr
    # the command the error points to exists and lists the field the user meant
    hint = re.search(r"see `oikyo (config [^`]+)`", r.stderr).group(1).split()
    fields = subprocess.run([sys.executable, "-m", "oikyo_ray.cli", *hint], capture_output=True, text=True, timeout=120)
    assert fields.returncode == 0 and "train.lr = " in fields.stdout, fields.stderr


def test_finetune_resume_refuses_what_it_cannot_continue(tmp_path, cache_dir, capsys):
    from oikyo_ray.cli import main

    demo = str(ROOT / "jobs/configs/demo.yaml")
    base = [f"run.root={tmp_path}", f"model.cache_dir={cache_dir}"]
    assert main(["finetune", demo, *base, "--resume"]) == 2
    assert "needs run.name" in capsys.readouterr().err
    assert main(["finetune", demo, *base, "run.name=gone", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("train: {lr: 0.5}\n")
    assert main(["finetune", demo, *base, "run.name=other", "--resume"]) == 2
    assert "other settings" in capsys.readouterr().err
