"""Licences of data files and the base model against `policy`, refused before Ray starts."""

import json

import pytest

from oikyo_ray.cli import main
from oikyo_ray.config import load_config
from oikyo_ray.data.licenses import LicenseError, check_licenses, licenses, model_license
from oikyo_ray.demo.run import DEMO_CONFIG


def _data(tmp_path, name: str, sidecar: str | None = None) -> str:
    f = tmp_path / name
    f.write_text(json.dumps({"instruction": "Capital of Peru?", "output": "Lima"}) + "\n")
    if sidecar is not None:
        (tmp_path / f"{name}.license").write_text(sidecar + "\n")
    return str(f)


def _model(tmp_path, card: str | None) -> str:
    d = tmp_path / "model"
    d.mkdir()
    if card is not None:
        (d / "README.md").write_text(card)
    return str(d)


def _cfg(paths, *overrides):
    return load_config(None, [f"data.paths={json.dumps(paths)}", "model.name_or_path=some/model", *overrides])


def test_sidecar_then_config_then_unknown(tmp_path):
    a = _data(tmp_path, "a.jsonl", sidecar="CC-BY-4.0")
    b = _data(tmp_path, "b.jsonl")
    c = _data(tmp_path, "c.jsonl")
    cfg = _cfg([a, b, c], f'data.licenses={{"{a}": mit, "{b}": apache-2.0}}')
    found = licenses(cfg, _model(tmp_path, "---\nlicense: Apache-2.0\nlanguage: en\n---\n# card"))
    assert found["data"][a] == {"license": "cc-by-4.0", "from": f"{a}.license"}  # the sidecar wins, lower-cased
    assert found["data"][b] == {"license": "apache-2.0", "from": "data.licenses"}
    assert found["data"][c]["license"] is None
    assert found["model"] == {"license": "apache-2.0", "from": "model card"}
    warned = []
    (tmp_path / "bare").mkdir()
    check_licenses(cfg, _model(tmp_path / "bare", None), warn=warned.append)  # a card without licence
    assert any("c.jsonl has no licence" in w for w in warned) and any("base model" in w for w in warned)


@pytest.mark.parametrize(
    "sidecar, card, overrides, words",
    [
        ("cc-by-nc-4.0", None, ["policy.commercial_use=true"], "licensed 'cc-by-nc-4.0' ("),
        ("cc-by-nc-sa-4.0", None, ["policy.commercial_use=true"], "forbids commercial use"),
        ("gpl-3.0", None, ["policy.allowed_licenses=[mit, apache-2.0]"], "not in policy.allowed_licenses"),
        (
            None,
            None,
            ["policy.unknown_license=refuse"],
            "has no licence (none declared); policy.unknown_license=refuse",
        ),
        ("mit", "---\nlicense: llama3\n---\n", ["policy.allowed_licenses=[mit]"], "base model"),
        ("mit", "no front matter", ["policy.unknown_license=refuse"], "no licence in the model card"),
    ],
)
def test_policy_refusals_name_the_file_or_model(tmp_path, sidecar, card, overrides, words):
    f = _data(tmp_path, "rows.jsonl", sidecar=sidecar)
    cfg = _cfg([f], *overrides)
    with pytest.raises(LicenseError) as e:
        check_licenses(cfg, _model(tmp_path, card), warn=lambda m: None)
    assert words in str(e.value) and "hint:" in str(e.value)
    assert ("base model" in str(e.value)) or (f in str(e.value))


def test_allowed_and_commercial_pass(tmp_path):
    f = _data(tmp_path, "rows.jsonl", sidecar="cc-by-4.0")
    cfg = _cfg([f], "policy.commercial_use=true", "policy.allowed_licenses=[cc-by-4.0, mit]")
    assert check_licenses(cfg, _model(tmp_path, "---\nlicense: mit\n---\n"))["model"]["license"] == "mit"
    assert model_license(str(tmp_path / "nowhere")) is None


def test_shared_dataset_with_a_declared_licence(shared_dir):
    alpaca = str(shared_dir / "datasets" / "alpaca_en_demo.json")
    cfg = _cfg([alpaca], f'data.licenses={{"{alpaca}": cc-by-nc-4.0}}', "policy.commercial_use=true")
    with pytest.raises(LicenseError, match="alpaca_en_demo.json is licensed 'cc-by-nc-4.0' .data.licenses."):
        check_licenses(cfg, "unused", warn=lambda m: None)


def test_finetune_refuses_before_ray_starts(tmp_path, base_overrides, capsys):
    import ray

    was = ray.is_initialized()
    f = _data(tmp_path, "rows.jsonl", sidecar="cc-by-nc-4.0")
    rc = main(["finetune", str(DEMO_CONFIG), *base_overrides, f"data.paths=[{f}]", "policy.commercial_use=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "forbids commercial use" in err and "rows.jsonl" in err
    assert ray.is_initialized() == was  # refused before Ray started
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run dir
