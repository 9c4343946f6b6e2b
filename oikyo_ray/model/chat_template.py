"""The documented default chat template, used when a tokenizer ships none (ChatML layout,
tools as in Hermes/Qwen 2.5).

    <|im_start|>{role}\n{content}<|im_end|>\n   ... per message, then for generation
    <|im_start|>assistant\n
With `tools` (a row's function schemas), the system turn (the row's own system prompt, if any,
then a "# Tools" section) lists them one JSON object a line between <tools></tools>; an
assistant turn that calls a tool (`tool_call`: its content is the call as JSON) is wrapped in
<tool_call></tool_call>; tool results are `tool` turns. An assistant turn's `reasoning` (its
thinking trace) comes first, as THINK_BLOCK: ``<think>\n{reasoning}\n</think>\n\n``, then the
answer. The tools block depends only on the row, so every prefix of a conversation renders as
a prefix of the whole (prompt masking needs that).
"""

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_BLOCK = "<think>\n{}\n</think>\n\n"  # how the embedded template writes a reasoning trace

DEFAULT_CHAT_TEMPLATE = (  # one expression a message: rendered twice per answer when tokenising
    "{% set merge = tools and messages and messages[0]['role'] == 'system' %}"
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if merge %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for m in (messages[1:] if merge else messages) %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + (('<think>\n' + m.reasoning + '\n</think>\n\n') if m.reasoning else '') "
    "+ (('<tool_call>\n' + m['content'] + '\n</tool_call>') "
    "if m.tool_call else m['content']) + '<|im_end|>\n' }}"
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
