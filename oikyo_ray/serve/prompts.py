"""The prompt text a request asks the model to continue (Ray-free).

Chat messages take training's path: `data/formats.py` normalises them as it does an OpenAI-messages
row (typed text parts joined, assistant `tool_calls` become tool-call turns, `tool` messages tool
turns, `tools` checked), and `model/prompt.py` renders them with the tools, so a served model is
asked exactly as it was taught. Invalid messages raise the formats `RowError`, which names the
message and field (answered 400).
"""

from __future__ import annotations

from oikyo_ray.data.formats import normalise
from oikyo_ray.model.prompt import render_prompt
from oikyo_ray.serve.http_errors import InvalidRequest
from oikyo_ray.serve.protocol import ChatRequest, CompletionRequest


def chat_prompt(tokenizer, req: ChatRequest) -> str:
    row = {"messages": [m.model_dump(exclude_none=True) for m in req.messages], "tools": req.tools}
    messages, meta = normalise(row)
    return render_prompt(tokenizer, messages, meta.get("tools"))


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    return list(req.prompt)


def check_prompt_ids(ids: list[int], max_tokens: int, vocab_size: int) -> None:
    """A token-id prompt: within the length limit, and every id one the tokenizer knows (an id past
    the embedding table would fail the whole batch's forward pass)."""
    if len(ids) > max_tokens:
        raise InvalidRequest(f"prompt has {len(ids)} tokens > limit {max_tokens}", param="prompt")
    bad = next((i for i, t in enumerate(ids) if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"prompt: token id {ids[bad]} (position {bad}) is not in the vocabulary (ids 0..{vocab_size - 1})",
            param="prompt",
        )


def text_size(req: ChatRequest) -> int:
    """Characters of message text and tool-call arguments: a cheap lower bound of the rendered
    prompt's size, known before the template runs."""
    n = 0
    for m in req.messages:
        parts = [m.content] if isinstance(m.content, str) else [p.get("text") for p in m.content or []]
        calls = [c.get("function") for c in m.tool_calls or []]
        parts += [f.get("arguments") for f in calls if isinstance(f, dict)]
        n += sum(len(p) for p in parts if isinstance(p, str))
    return n


def check_prompt_size(size: int, max_tokens: int, bytes_per_token: int) -> None:
    """Refuse a prompt certainly over the token limit from its length alone, before tokenising it:
    no tokenizer worth serving averages `bytes_per_token` bytes (or characters) a token."""
    if size > max_tokens * bytes_per_token:
        raise InvalidRequest(
            f"prompt is too long: over {max_tokens * bytes_per_token} bytes (limit {max_tokens} tokens)"
        )


def check_prompt_length(tokenizer, prompt: str, limit: int) -> int:
    """The prompt's token count, refused over `limit`."""
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n > limit:
        raise InvalidRequest(f"prompt has {n} tokens > limit {limit}")
    return n
