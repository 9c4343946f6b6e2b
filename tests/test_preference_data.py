"""Preference data through the data stage (no Ray): TRL and LLaMA-Factory pair rows and KTO rows
become prompt / chosen / rejected token columns, bad pairs are rejected naming file and row, and
method.objective refuses data and settings that do not fit it (config, then the prepared manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oikyo_ray.config import OikyoConfig, load_config
from oikyo_ray.data.curate import NO_LABEL
from oikyo_ray.data.formats import RowError, normalise
from oikyo_ray.data.prepare import prepare
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.data.tokenize import IGNORE, encode_messages, encode_preference
from oikyo_ray.errors import ConfigError, OikyoError
from oikyo_ray.train.checks import check_before_ray, check_objective_data

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
SFT_FILE = Path(__file__).parent / "fixtures" / "data" / "messages_rows.jsonl"


def cfg_for(tmp: Path, files: list, *overrides: str) -> OikyoConfig:
    return load_config(
        None,
        [
            f"data.paths=[{', '.join(map(str, files))}]",
            f"model.cache_dir={tmp / 'cache'}",
            "data.cache=false",
            "data.max_length=512",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    from oikyo_ray.model.chat_template import ensure_chat_template

    t = AutoTokenizer.from_pretrained(tiny_model)
    ensure_chat_template(t)
    return t


# ---- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},  # TRL standard
        {"prompt": [U("Q")], "chosen": [A("good")], "rejected": [A("bad")]},  # TRL conversational
        {"chosen": [U("Q"), A("good")], "rejected": [U("Q"), A("bad")]},  # TRL implicit prompt
        {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
         "rejected": {"from": "gpt", "value": "bad"}},  # LLaMA-Factory sharegpt (dpo_en_demo)
        {"instruction": "Q", "chosen": "good", "rejected": "bad"},  # LLaMA-Factory alpaca
    ],
)  # fmt: skip
def test_pair_formats_normalise_alike(row):
    assert normalise(row) == ([U("Q"), A("good")], {"rejected": A("bad")})


def test_trl_unpaired_rows_carry_the_label():
    assert normalise({"prompt": "Q", "completion": "c", "label": False}) == ([U("Q"), A("c")], {"label": False})
    row = {"prompt": [U("Q")], "completion": [A("c")], "label": True}
    assert normalise(row) == ([U("Q"), A("c")], {"label": True})


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": [U("Q"), A("a")], "rejected": [U("P"), A("b")]}, "differ before their last turn"),
        ({"prompt": "Q", "chosen": "same", "rejected": " same "}, "identical"),
        ({"prompt": "Q", "chosen": "a", "rejected": ""}, "rejected: empty answer"),
        ({"prompt": "Q", "chosen": [U("a")], "rejected": "b"}, "must be an assistant turn"),
    ],
)
def test_bad_pairs_are_refused(row, message):
    with pytest.raises(RowError, match=message):
        normalise(row)


# ---- tokenisation ------------------------------------------------------------------------------


def test_prompt_is_tokenised_once_and_responses_are_what_sft_learns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, U("What is 2+2?"), A("4"), U("And 3+3?"), A("6")]
    enc = encode_preference(tok, msgs, A("seven"), max_length=512)
    sft = encode_messages(tok, msgs, max_length=512)
    n = len(enc["prompt_ids"])
    # the chosen sequence is exactly the SFT row, whose last answer is the chosen response
    assert enc["prompt_ids"] + enc["chosen_ids"] == sft["input_ids"]
    assert sft["labels"][n:] == enc["chosen_ids"]
    assert tok.decode(enc["rejected_ids"]).startswith("seven")
    assert tok.decode(enc["prompt_ids"]).endswith("assistant\n")


def test_responses_are_cut_to_fit_and_a_too_long_prompt_is_refused(tok):
    msgs = [U("word " * 40), A("yes " * 50)]
    prompt = len(encode_preference(tok, msgs, A("no"), max_length=512)["prompt_ids"])
    enc = encode_preference(tok, msgs, A("no " * 50), max_length=prompt + 5)
    assert len(enc["chosen_ids"]) == len(enc["rejected_ids"]) == 5
    with pytest.raises(ValueError, match=f"the prompt is {prompt} tokens"):
        encode_preference(tok, msgs, A("no"), max_length=prompt)


# ---- the data stage ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_demo(shared_dir, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    f = shared_dir / "datasets" / "dpo_en_demo.json"
    cfg = cfg_for(tmp, [f])
    return cfg, prepare(cfg, str(tiny_model), tmp / "out"), tmp / "out"


def test_dpo_demo_becomes_pair_columns(dpo_demo):
    _, manifest, out = dpo_demo
    rows = load_split_rows(out, "train")
    assert len(rows) > 50 and manifest["meta"]["preference"] == manifest["counts"]["accepted"]
    (inp,) = manifest["inputs"]
    fit = [r for r in rows if r["prompt_ids"]]
    # multi-turn rows whose last prompt leaves no room stay (SFT learns their earlier answers)
    assert inp["no_room"] > 0 and len(rows) - len(fit) <= inp["no_room"]
    for r in fit:
        n = len(r["prompt_ids"])
        assert n and r["chosen_ids"] and r["rejected_ids"] and r["chosen_ids"] != r["rejected_ids"]
        assert r["desirable"] == NO_LABEL
        # the SFT columns are the chosen conversation: the same tokens, the chosen answer learned
        assert r["input_ids"] == r["prompt_ids"] + r["chosen_ids"] and r["labels"][n:] == r["chosen_ids"]
        if len(json.loads(r["messages"])) == 2:  # one turn: nothing of the prompt is learned
            assert set(r["labels"][:n]) == {IGNORE}
        assert n + len(r["chosen_ids"]) <= 512 and n + len(r["rejected_ids"]) <= 512
    assert inp["preference"] == inp["accepted"] and inp["labelled"] == 0


def test_rejected_pairs_name_file_and_row(tmp_path, tiny_model):
    f = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Say hi", "chosen": "Hello there, friend!", "rejected": "Go away."},
        {"prompt": "Say hi", "chosen": "Same answer", "rejected": "Same answer"},
        {"prompt": "Say bye", "chosen": "Goodbye, see you soon!", "rejected": "  "},
        {"prompt": "Say what", "chosen": "", "rejected": "What?"},
        {"prompt": "Name a colour", "chosen": "Blue is a colour.", "rejected": "Seven."},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = prepare(
        cfg_for(tmp_path, [f], "data.val_fraction=0", "data.test_fraction=0"), str(tiny_model), tmp_path / "o"
    )
    rejects = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    got = {(r["source"], r["row"]): (r["filter"], r["reason"]) for r in rejects}
    assert got == {
        (str(f), 2): ("preference", "chosen and rejected answers are identical"),
        (str(f), 3): ("empty_turn", "rejected: empty answer"),
        (str(f), 4): ("empty_turn", "messages[1]: empty assistant message"),
    }
    assert manifest["counts"]["accepted"] == manifest["inputs"][0]["preference"] == 2


def test_kto_demo_keeps_labels_and_one_completion(shared_dir, tiny_model, tmp_path):
    f = shared_dir / "datasets" / "kto_en_demo.json"
    cfg = cfg_for(tmp_path, [f], "method.objective=kto")
    manifest = prepare(cfg, str(tiny_model), tmp_path / "out")
    rows = load_split_rows(tmp_path / "out", "train")
    assert {r["desirable"] for r in rows} == {0, 1}
    fit = [r for r in rows if r["prompt_ids"]]
    assert len(fit) >= len(rows) - manifest["inputs"][0]["no_room"]
    assert all(r["chosen_ids"] and not r["rejected_ids"] for r in fit)
    (inp,) = manifest["inputs"]
    assert inp["labelled"] == inp["accepted"] and inp["preference"] == 0
    check_objective_data(cfg, manifest)  # kto fits labelled rows
    with pytest.raises(OikyoError, match=r"(?s)method.objective=dpo .*kto_en_demo.json: \d+ of \d+ kept rows have no"):
        check_objective_data(cfg_for(tmp_path, [f], "method.objective=dpo"), manifest)


def test_objective_data_check_names_field_and_file(dpo_demo, tmp_path, tiny_model):
    cfg, manifest, _ = dpo_demo
    for objective in ("dpo", "ipo", "orpo", "simpo", "kto"):  # kto: each pair is one good, one bad completion
        check_objective_data(
            cfg.model_copy(update={"method": cfg.method.model_copy(update={"objective": objective})}), manifest
        )
    sft = prepare(cfg_for(tmp_path, [SFT_FILE]), str(tiny_model), tmp_path / "sft")
    with pytest.raises(OikyoError) as e:
        check_objective_data(cfg_for(tmp_path, [SFT_FILE], "method.objective=dpo"), sft)
    assert "method.objective=dpo" in str(e.value) and f"{SFT_FILE}: " in str(e.value) and "'rejected'" in str(e.value)
    check_objective_data(cfg_for(tmp_path, [SFT_FILE]), sft)  # sft takes anything


# ---- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["method.objective=dpo", "method.simpo_gamma=1"], "method.simpo_gamma applies to method.objective simpo"),
        (["method.objective=kto", "method.label_smoothing=0.1"], "method.label_smoothing applies to"),
        (["method.beta=0.3"], "method.beta applies to"),
        (["method.objective=orpo", "method.kto_desirable_weight=2"], "method.kto_desirable_weight"),
        (["method.objective=dpo", "method.type=full"], "method.type=full needs a reference model"),
        (["method.objective=simpo", "data.packing=true"], "data.packing"),
        (["method.objective=dpo", "data.train_on_prompt=true"], "data.train_on_prompt"),
        (["method.objective=kto", "data.reject_undesired=true"], "data.reject_undesired"),
        (["method.objective=grpo"], "method.objective"),
        (["method.objective=dpo", "method.label_smoothing=0.5"], "method.label_smoothing"),
    ],
)
def test_objective_settings_that_do_not_fit_are_refused(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_objective_config_survives_the_trip_to_the_workers():
    cfg = load_config(None, ["method.objective=simpo", "method.label_smoothing=0.1", "method.simpo_gamma=1.0"])
    again = OikyoConfig.model_validate(cfg.model_dump())
    assert again.method == cfg.method and again.method.preference_beta == 2.0
    assert load_config(None, ["method.objective=dpo"]).method.preference_beta == 0.1
    assert load_config(None, ["method.objective=dpo", "method.beta=0.5"]).method.preference_beta == 0.5


def test_every_objective_runs_on_ray_train():
    from typing import get_args

    from oikyo_ray.config import Objective
    from oikyo_ray.train.checks import TRAINED_OBJECTIVES

    assert set(get_args(Objective)) == set(TRAINED_OBJECTIVES)
    for objective in TRAINED_OBJECTIVES:
        check_before_ray(load_config(None, [f"method.objective={objective}"]))


def test_pairs_that_all_lack_room_are_refused():
    cfg = load_config(None, ["method.objective=dpo", "data.max_length=64"])
    inputs = [{"path": "a.json", "accepted": 3, "preference": 3, "labelled": 0, "no_room": 3}]
    with pytest.raises(OikyoError, match=r"no kept row leaves room .*data\.max_length=64"):
        check_objective_data(cfg, {"inputs": inputs})
    check_objective_data(cfg, {"inputs": [{**inputs[0], "no_room": 2}]})
