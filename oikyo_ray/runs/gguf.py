"""A merged model as one GGUF file (llama.cpp, Ollama, LM Studio) and an Ollama `Modelfile`.

Written with the `gguf` package (llama.cpp's own writer, tensor-name map and quantisers) from the
merged model in memory and its Hugging Face tokenizer; nothing is shelled out to llama.cpp's
convert script, which is not packaged. Read back by transformers' GGUF loader in the tests.
Ray-free.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from oikyo_ray.errors import OikyoError

QUANTS = ("f16", "q8_0")
# HF model_type -> GGUF architecture; Mistral is the Llama layout to llama.cpp
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# token types llama.cpp knows (gguf.TokenType): NORMAL, CONTROL (special), USER_DEFINED (added)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
GPT2_PRE = "gpt2"  # llama.cpp's name for the plain GPT-2 split


def _gguf():
    try:
        import gguf  # noqa: PLC0415  (an optional dependency: only this export needs it)
    except ImportError as e:
        raise OikyoError("GGUF export needs the gguf package", hint="pip install 'oikyo-ray[gguf]'") from e
    return gguf


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's rotary layout for Llama q/k rows (convert_hf_to_gguf.py `LlamaModel.permute`):
    HF rotates halves of each head, llama.cpp interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _pre_tokenizer(tok: dict) -> str:
    """The `tokenizer.ggml.pre` name for this tokenizer's pre-tokenization, or an error: a wrong
    name would make llama.cpp split text differently from training, silently."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PRE
    raise OikyoError(
        f"GGUF export: cannot name this tokenizer's pre-tokenizer for llama.cpp ({pre.get('type')})",
        hint="GGUF export supports byte-level BPE tokenizers with GPT-2 pre-tokenization; export safetensors "
        "(--merge) and convert with llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers",
    )


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their llama.cpp types, and the BPE merges, from the fast tokenizer's JSON."""
    tok = _tokenizer_json(tokenizer)
    model = tok["model"]
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (tok.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise OikyoError(
            "GGUF export supports byte-level BPE tokenizers with GPT-2 pre-tokenization only",
            hint="export safetensors with --merge and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [NORMAL] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = text
    for added in tok.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    # the embedding may be padded past the tokenizer (a multiple of 64 is common): llama.cpp wants
    # one entry per row, as its converter writes them
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges  # type: ignore[return-value]


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0)


def _tensor_type(gguf, data: np.ndarray, quant: str):
    """llama.cpp's choice: 1-D tensors (norms, biases) stay f32; q8_0 needs rows in 32-wide blocks,
    a tensor whose rows are not falls back to f16 as llama.cpp's converter does."""
    q = gguf.GGMLQuantizationType
    if data.ndim == 1:
        return q.F32
    if quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0:
        return q.Q8_0
    return q.F16


def write_gguf(model, tokenizer, out: Path, quant: str = "f16", name: str = "model") -> Path:
    """Write `model` (a transformers causal LM, adapters already merged) and `tokenizer` as one
    GGUF file at `out`."""
    if quant not in QUANTS:
        raise OikyoError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    gguf = _gguf()
    cfg = model.config
    arch = ARCHS.get(cfg.model_type)
    if arch is None:
        raise OikyoError(
            f"GGUF export supports {', '.join(sorted(ARCHS))} models; this one is {cfg.model_type!r}",
            hint="export safetensors with --merge and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    tok_json = _tokenizer_json(tokenizer)
    pre = _pre_tokenizer(tok_json)
    tokens, types, merges = _vocab(tokenizer, cfg.vocab_size)
    # written under a temporary name and renamed once whole: a failed export leaves no half file
    partial = out.with_name(out.name + ".partial")
    try:
        _write(gguf, model, tokenizer, partial, quant, name, arch, pre, (tokens, types, merges))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(out)
    return out


def _write(gguf, model, tokenizer, out: Path, quant: str, name: str, arch: str, pre: str, vocab) -> None:
    cfg = model.config
    tokens, types, merges = vocab
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("eos", w.add_eos_token_id), ("bos", w.add_bos_token_id), ("pad", w.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(False)  # byte-level BPE tokenizers here add none; the template writes what it needs
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    state = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    for hf_name, t in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise OikyoError(f"GGUF export: no llama.cpp name for tensor {hf_name!r} of a {cfg.model_type} model")
        t = t.detach().float()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            t = _permute(t, n_head, n_head)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            t = _permute(t, n_head, n_kv)
        data = t.numpy()
        qtype = _tensor_type(gguf, data, quant)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gg_name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gg_name, data.astype(np.float16))
        else:
            w.add_tensor(gg_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Ollama's templates are Go templates, not Jinja: the ChatML layout oikyo's default template (and
# Qwen's) renders, written out; for any other template Ollama reads tokenizer.chat_template from
# the GGUF and matches it against the templates it knows.
CHATML_GO = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for the GGUF next to it: its template and the stop tokens."""
    template = getattr(tokenizer, "chat_template", None) or ""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    lines = [f"FROM ./{gguf_name}", ""]
    if "<|im_start|>" in template:
        lines += [f'TEMPLATE """{CHATML_GO}"""', ""]
        stops.append("<|im_end|>")
    else:
        lines += ["# no TEMPLATE: Ollama takes the chat template stored in the GGUF (tokenizer.chat_template)", ""]
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"
