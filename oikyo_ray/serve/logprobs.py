"""Token log-probabilities in the OpenAI completions shape (Ray-free).

    logprobs_of(model, tokenizer, ids, first, top_k, **forward_kwargs)
        -> {"tokens", "token_logprobs", "top_logprobs", "text_offset"} for ids[first:]

One forward pass over the whole sequence scores every token given the ones before it, from the
model's raw distribution (no temperature or top-p: what vLLM reports by default, and what
lm-eval-harness's loglikelihood tasks sum). The first token of a sequence has no context, so its
logprob is None, as in OpenAI's `echo` responses.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def logprobs_of(model, tokenizer, ids: list[int], first: int, top_k: int, **forward_kwargs) -> dict:
    """Logprobs of `ids[first:]` (echo: first=0; generated tokens only: first=len(prompt)), with
    the `top_k` most likely tokens at each of those positions."""
    x = torch.tensor([ids], device=model.device)
    logp = torch.log_softmax(model(input_ids=x, **forward_kwargs).logits[0].float(), dim=-1)  # [n, vocab]
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    offset = len(tokenizer.decode(ids[:first], skip_special_tokens=False)) if first else 0
    for pos in range(first, len(ids)):
        piece = tokenizer.decode([ids[pos]], skip_special_tokens=False)
        tokens.append(piece)
        text_offset.append(offset)
        offset += len(piece)
        if pos == 0:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        row = logp[pos - 1]
        token_logprobs.append(float(row[ids[pos]]))
        top: dict[str, float] = {}
        if top_k:
            values, top_ids = row.topk(top_k)
            for v, t in zip(values.tolist(), top_ids.tolist()):
                top.setdefault(tokenizer.decode([t], skip_special_tokens=False), v)  # pieces may decode alike
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
