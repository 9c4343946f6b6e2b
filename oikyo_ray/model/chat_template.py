"""The documented default chat template, used when a tokenizer ships none (ChatML layout).

    <|im_start|>{role}\n{content}<|im_end|>\n   ... per message, then for generation
    <|im_start|>assistant\n
"""

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give a template-less tokenizer the default one, and a pad token if it lacks one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: eos and, where known, the end-of-turn marker."""
    ids = {tokenizer.eos_token_id}
    tid = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
        ids.add(tid)
    return sorted(i for i in ids if i is not None)
