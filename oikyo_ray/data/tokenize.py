"""Tokenisation with prompt masking (Ray-free); rendering is `model/prompt.py`'s.

The conversation is rendered up to each point where learning starts or stops (before an
assistant turn, with the generation prompt, and after it); each piece is the difference between
consecutive renderings. Assistant content (and its end-of-turn token) is learned, everything else
gets label -100 unless `train_on_prompt` (then the whole rendering is one learned piece); an
assistant turn marked `train: False` (a per-turn loss weight of 0) is masked like a prompt, and a
reasoning block (`<think>...</think>`, as the template renders it) is learned only with
`train_on_reasoning`. A row's
`tools` (function schemas) are passed to the chat template, which renders them where it supports
tools.
"""

from __future__ import annotations

from oikyo_ray.model.chat_template import THINK_BLOCK
from oikyo_ray.model.prompt import render

IGNORE = -100


class NoRoom(ValueError):
    """A preference row's prompt leaves no room for its answers within data.max_length."""


def encode_messages(
    tokenizer,
    msgs: list[dict],
    max_length: int,
    train_on_prompt: bool = False,
    tools: list | None = None,
    train_on_reasoning: bool = True,
) -> dict:
    """{"input_ids", "labels", "full_length"}: right-truncated to max_length (full_length is the
    length before truncation); at least one label survives or the caller gets a ValueError (a row
    with no learnable token after truncation is useless). An assistant turn with `train: False`
    is masked; its `reasoning` block is learned only with `train_on_reasoning`."""
    pieces: list[tuple[str, bool]] = []  # (text, learned), tokenised together below
    prev = ""

    def upto(n: int, learn: bool, add_generation_prompt: bool = False) -> None:
        nonlocal prev
        text = render(tokenizer, msgs[:n], tools, add_generation_prompt=add_generation_prompt)
        if not text.startswith(prev):
            raise ValueError("chat template is not prefix-stable; cannot mask prompts")
        if len(text) > len(prev):
            new = text[len(prev) :]
            reasoning = msgs[n - 1].get("reasoning") if n else None
            pieces.extend(
                _reasoning_pieces(new, reasoning, learn, train_on_reasoning, n - 1) if reasoning else [(new, learn)]
            )
        prev = text

    # render only where learning starts or stops (before and after each assistant turn): a run
    # of prompt turns is one piece, tokenised as at inference, where the prompt is one text.
    # A row trained whole (train_on_prompt, nothing masked) is one piece.
    masked = any(m.get("train") is False or (m.get("reasoning") and not train_on_reasoning) for m in msgs)
    whole = train_on_prompt and not masked
    if not whole:
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                if i:
                    upto(i, train_on_prompt, add_generation_prompt=True)
                upto(i + 1, m.get("train", True))
    if whole or not msgs or msgs[-1]["role"] != "assistant":
        upto(len(msgs), train_on_prompt)  # the whole, or the turns after the last answer
    ids: list[int] = []
    labels: list[int] = []
    for new, (_, learn) in zip(_encode_pieces(tokenizer, [t for t, _ in pieces]), pieces):
        ids.extend(new)
        labels.extend(new if learn else [IGNORE] * len(new))
    full, full_labels = len(ids), labels
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels):
        first = next((i for i, x in enumerate(full_labels) if x != IGNORE), None)
        if first is None:
            raise ValueError("no answer tokens (nothing for the assistant to learn)")
        raise ValueError(
            f"no answer tokens within data.max_length={max_length}: the prompt is {first} "
            f"tokens (whole conversation {full})"
        )
    return {"input_ids": ids, "labels": labels, "full_length": full}


def _reasoning_pieces(text: str, reasoning: str, learn: bool, train_on_reasoning: bool, i: int) -> list:
    """An answer's rendering cut around its reasoning block, so the block can be masked alone."""
    block = THINK_BLOCK.format(reasoning)
    at = text.find(block)
    if at < 0:
        raise ValueError(
            f"messages[{i}] has a reasoning trace the chat template does not render as "
            f"{THINK_BLOCK.format('...')!r}; use a template that writes <think> blocks (the embedded one does)"
        )
    end = at + len(block)
    return [(text[:at], learn), (block, learn and train_on_reasoning), (text[end:], learn)]


def encode_preference(
    tokenizer, msgs: list[dict], rejected: dict | None, max_length: int, tools: list | None = None
) -> dict:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} of a preference row: the turns before the final
    answer (with the assistant header) tokenised once as the prompt, as at inference, then each
    response: the final assistant turn `msgs[-1]` (chosen, or a KTO completion) and `rejected`
    (a pair's other answer; None gives no rejected ids). Every response token is learned, the
    prompt none. Responses are right-truncated so prompt + response fits max_length; a prompt
    that leaves no room raises NoRoom (a ValueError)."""
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError("a preference row must end with the assistant's answer")
    head = msgs[:-1]
    prompt = render(tokenizer, head, tools, add_generation_prompt=True)
    answers = [msgs[-1]] + ([rejected] if rejected is not None else [])
    texts = [prompt]
    for answer in answers:
        full = render(tokenizer, [*head, answer], tools)
        if not full.startswith(prompt):
            raise ValueError("chat template is not prefix-stable; cannot mask prompts")
        texts.append(full[len(prompt) :])
    prompt_ids, *responses = _encode_pieces(tokenizer, texts)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise NoRoom(f"no answer tokens within data.max_length={max_length}: the prompt is {len(prompt_ids)} tokens")
    responses = [r[:room] for r in responses]
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": responses[0],
        "rejected_ids": responses[1] if rejected is not None else [],
    }


def _encode_pieces(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added; one call into a fast tokenizer's Rust
    backend per conversation (the Python wrapper per piece cost more than the tokenising)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
