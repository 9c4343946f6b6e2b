"""Batched greedy/sampled generation for chat prompts (Ray-free; shared by eval and serving)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from oikyo_ray.model.chat_template import stop_token_ids


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties: each token's logit drops by
    `frequency * count + presence * (count > 0)`, counting the tokens generated so far (not the
    prompt's, as OpenAI defines them). transformers' `repetition_penalty` is a different rule
    (it scales logits and counts the prompt), so it is not a substitute."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0):
        self.presence, self.frequency = presence, frequency
        self.width: int | None = None  # prompt width (left-padded): later columns were generated

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            self.width = input_ids.shape[1]
        generated = input_ids[:, self.width :]
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def penalty_processors(presence: float | None, frequency: float | None) -> LogitsProcessorList:
    """The processors for a request's penalties (none when both are unset or 0)."""
    if not presence and not frequency:
        return LogitsProcessorList()
    return LogitsProcessorList([OpenAIPenalties(presence or 0.0, frequency or 0.0)])


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    **generate_kwargs,
) -> list[dict]:
    """Complete each prompt (text, or token ids as OpenAI's completions API allows); returns
    [{"text", "prompt_tokens", "completion_tokens", "finish_reason", "token_ids"}], `token_ids`
    being the tokens the model emitted, its stop token included (logprobs score it, as OpenAI's
    do). Penalties are OpenAI's (`OpenAIPenalties`). Extra keyword arguments go to
    `model.generate` (e.g. peft's per-row `adapter_names`)."""
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so answers start aligned
    prompt_ids = [p if isinstance(p, list) else tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    enc = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    stops = stop_token_ids(tokenizer)
    kwargs = {
        "do_sample": temperature > 0,
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stops,
        "pad_token_id": tokenizer.pad_token_id,
        "logits_processor": penalty_processors(presence_penalty, frequency_penalty),
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    out = model.generate(**enc, **kwargs, **generate_kwargs)
    results = []
    width = enc["input_ids"].shape[1]
    for i, row in enumerate(out[:, width:].tolist()):
        cut = next((j for j, t in enumerate(row) if t in stops), None)
        ids = row if cut is None else row[:cut]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        finish = "stop" if cut is not None else "length"
        for s in stop or []:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        results.append(
            {
                "text": text,
                "prompt_tokens": int(enc["attention_mask"][i].sum()),
                "completion_tokens": len(ids),
                "finish_reason": finish,
                "token_ids": row if cut is None else row[: cut + 1],
            }
        )
    return results
