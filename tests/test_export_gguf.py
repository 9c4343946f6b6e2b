"""`oikyo runs export RUN --format gguf`: the merged model as one GGUF file plus an Ollama
Modelfile, read back by transformers' own GGUF loader (the `gguf` package underneath): same token
ids for a chat-templated prompt, the same logits as the adapter on its base (f16 to rounding, q8_0
to its quantisation), the chat template and stop tokens carried. Ray-free."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install -e '.[test]')")

from oikyo_ray.cli import main  # noqa: E402
from oikyo_ray.config import dump_yaml, load_config  # noqa: E402
from oikyo_ray.errors import OikyoError  # noqa: E402
from oikyo_ray.runs.export import export_run  # noqa: E402
from oikyo_ray.runs.gguf import CHATML_GO, write_gguf  # noqa: E402

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 12 plus 30? Ünïcödé, tabs\tand  spaces."},
]


@pytest.fixture(scope="module")
def run(tiny_model, cache_dir, tmp_path_factory) -> Path:
    """A finished LoRA run (random, non-zero adapter weights: a merge that dropped them would show)."""
    from peft import LoraConfig, get_peft_model

    from oikyo_ray.model.load import load_model

    cfg = load_config(None, [f"model.cache_dir={cache_dir}"])
    run = tmp_path_factory.mktemp("gguf") / "r1"
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(load_model(cfg.model, str(tiny_model)), lora).save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(dump_yaml(cfg))
    return run


def _reference(run: Path, tiny_model: Path):
    """The adapter on its base through peft, unmerged: what the GGUF must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    return PeftModel.from_pretrained(base, str(run / "adapter")).eval(), AutoTokenizer.from_pretrained(tiny_model)


def _from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_f16_gguf_loads_back_with_the_adapters_logits_and_tokenizer(run, tiny_model, tmp_path):
    import gguf

    out = export_run(run, tmp_path / "out", fmt="gguf", quant="f16")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "model-f16.gguf"]
    ref, tok = _reference(run, tiny_model)
    model, gtok = _from_gguf(out / "model-f16.gguf")

    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(text).input_ids
    assert gtok(text).input_ids == ids and gtok.decode(ids) == text  # specials stay whole, bytes round-trip
    want, got = _logits(ref, ids), _logits(model, ids)
    # base logits alone would differ by far more: the adapter is in the file
    with ref.disable_adapter():
        assert (want - _logits(ref, ids)).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # f16 rounding only

    fields = gguf.GGUFReader(str(out / "model-f16.gguf")).fields
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == tok.chat_template
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tok.eos_token_id
    assert "merged into the base" in (out / "README.md").read_text()


def test_q8_0_gguf_is_smaller_and_close(run, tiny_model, tmp_path):
    assert main(["runs", "export", str(run), "--out", str(tmp_path / "q"), "--format", "gguf", "--quant", "q8_0"]) == 0
    q8 = tmp_path / "q" / "model-q8_0.gguf"
    f16 = export_run(run, tmp_path / "f", fmt="gguf") / "model-f16.gguf"
    assert q8.stat().st_size < 0.75 * f16.stat().st_size
    ref, tok = _reference(run, tiny_model)
    ids = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)).input_ids
    want, got = _logits(ref, ids), _logits(_from_gguf(q8)[0], ids)
    cos = torch.nn.functional.cosine_similarity(want, got, dim=-1)
    assert cos.min() > 0.995, cos
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9


def test_modelfile_template_renders_what_the_chat_template_renders(run, tiny_model, tmp_path):
    """Ollama's TEMPLATE is Go, not Jinja: expanded by hand for these messages it gives the text
    the model was trained on, and the stop tokens end a turn."""
    out = export_run(run, tmp_path / "m", fmt="gguf")
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model-f16.gguf\n") and f'TEMPLATE """{CHATML_GO}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    _, tok = _reference(run, tiny_model)
    go_expanded = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)
    go_expanded += "<|im_start|>assistant\n"
    assert go_expanded == tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_bad_export_requests_name_what_to_fix(run, tmp_path, capsys):
    with pytest.raises(OikyoError, match="--quant 'q4' is not one of f16, q8_0"):
        export_run(run, tmp_path / "a", fmt="gguf", quant="q4")
    with pytest.raises(OikyoError, match="--format 'onnx' is not one of"):
        export_run(run, tmp_path / "b", fmt="onnx")
    with pytest.raises(SystemExit) as e:
        main(["runs", "export", str(run), "--out", str(tmp_path / "c"), "--quant", "q2_k", "--format", "gguf"])
    assert e.value.code == 2
    assert "invalid choice: 'q2_k'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unsupported_models_and_tokenizers_are_refused(tiny_model, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(tiny_model)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok)))
    with pytest.raises(OikyoError, match="supports llama, mistral, qwen2 models; this one is 'gpt2'") as e:
        write_gguf(gpt2, tok, tmp_path / "x.gguf")
    assert "convert_hf_to_gguf.py" in e.value.hint
    word = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    llama = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(OikyoError, match="pre-tokenizer"):
        write_gguf(llama, PreTrainedTokenizerFast(tokenizer_object=word), tmp_path / "y.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_full_fine_tune_run_exports_its_own_weights(tiny_model, cache_dir, tmp_path):
    """A full fine-tune leaves run/model (weights and tokenizer), no adapter: exported as they are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(None, [f"model.cache_dir={cache_dir}", "method.type=full"])
    run = tmp_path / "full"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # not the base: the export must read run/model
    model.save_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.save_pretrained(run / "model")
    (run / "config.yaml").write_text(dump_yaml(cfg))
    out = export_run(run, tmp_path / "out", fmt="gguf")
    ids = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)).input_ids
    got = _logits(_from_gguf(out / "model-f16.gguf")[0], ids)
    torch.testing.assert_close(got, _logits(model.eval(), ids), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_supported_shapes_round_trip(kind, tiny_model, tmp_path):
    """Qwen 2 (q/k/v biases, no rotary permutation) and Mistral (written as llama), both with
    grouped-query attention (2 kv heads for 4): the same logits back."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg = AutoConfig.for_model(kind, vocab_size=len(tok), num_key_value_heads=2, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    path = write_gguf(model, tok, tmp_path / f"{kind}.gguf")
    assert [p.name for p in tmp_path.iterdir()] == [f"{kind}.gguf"]  # the partial file was renamed
    ids = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)).input_ids
    torch.testing.assert_close(_logits(_from_gguf(path)[0], ids), _logits(model, ids), atol=2e-2, rtol=2e-2)


def test_a_tensor_llama_cpp_has_no_name_for_fails_and_leaves_no_file(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.model.register_buffer("router_bias", torch.zeros(4))  # not a Llama tensor
    with pytest.raises(OikyoError, match="no llama.cpp name for tensor 'model.router_bias'"):
        write_gguf(model, AutoTokenizer.from_pretrained(tiny_model), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []
