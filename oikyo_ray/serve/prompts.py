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


def completion_prompts(req: CompletionRequest) -> list[str]:
    return [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)


def check_prompt_length(tokenizer, prompt: str, limit: int) -> None:
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n > limit:
        raise InvalidRequest(f"prompt has {n} tokens > limit {limit}")
