"""The one place a conversation becomes the text a model reads (Ray-free).

Training's masked pieces (`data/tokenize.py`), evaluation's prompts (`eval/compare.py`) and the
serving API (`serve/`) all render here, so a model is asked at inference exactly as it was taught.
Messages are in oikyo's normalised schema (`data/formats.py`): `role`, `content` (text) and, for
an assistant turn that calls a tool, `tool_call: True` with the call as JSON in `content`, and
for a thinking trace, `reasoning` (the embedded template renders it as `THINK_BLOCK`); `tools`
are the conversation's function schemas, shown to the model by the chat template.
"""

from __future__ import annotations

KEYS = ("role", "content", "tool_call", "reasoning")  # what templates read; row-level extras stay out


def _clean(messages: list[dict]) -> list[dict]:
    return [{k: m[k] for k in KEYS if k in m} for m in messages]


def render(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """The chat template applied to `messages` (and `tools`, where given)."""
    kw = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        _clean(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **kw
    )


def render_prompt(tokenizer, messages: list[dict], tools: list | None = None) -> str:
    """What the model reads before it answers: the conversation so far and the assistant header."""
    return render(tokenizer, messages, tools, add_generation_prompt=True)
