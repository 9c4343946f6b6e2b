"""Normalise a raw row (alpaca, sharegpt, OpenAI messages, TRL, raw text) into one `messages` schema.

    normalise(row, data_cfg) -> (messages, meta)

`messages` is ``[{"role", "content"}]`` with roles system/user/assistant/tool; an assistant turn
that calls a function also carries ``"tool_call": True`` and its content is the call as JSON
(``{"name", "arguments"}``, or a list of them). An assistant turn may carry ``reasoning`` (its
thinking trace, read from ``reasoning`` parts, a ``reasoning_content`` field or a leading
``<think>...</think>`` block) and ``"train": False`` (masked: a per-turn ``loss_weight``/``weight``
of 0 or ``train: false``). Content is text or typed parts (text under ``text`` or ``value``).
Rows with images, video or audio are rejected: no model here can use them. `meta` keeps what is
not a turn but belongs to the example: ``tools`` (list of function schemas), ``label`` (KTO, bool) and ``rejected`` (the
dispreferred answer of a preference pair, whose ``chosen`` answer is the final assistant turn).

Every function here raises `RowError` with a reason a user can act on (and a `kind`, the filter
it counts under); the pipeline turns that into a rejects-file entry naming the source file and row.
"""

from __future__ import annotations

import json
from typing import Any

FUNCTION_CALL = "function_call"  # role-map target: an assistant turn that calls a tool


class RowError(ValueError):
    """This row cannot be used; the message is the reason written to the rejects file."""

    def __init__(self, message: str, kind: str = "format"):
        super().__init__(message)
        self.kind = kind


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": FUNCTION_CALL,
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and ("output" in row or "chosen" in row):
        return "alpaca"
    if ("prompt" in row and ("chosen" in row or "completion" in row)) or ("chosen" in row and "text" not in row):
        return "trl"
    if "text" in row:
        return "text"
    raise RowError(f"unknown row format (keys: {sorted(row)[:8]}); set data.format or data.columns")


def _text(value: Any, what: str) -> str:
    text, reasoning, calls = _parts(value, what)
    if reasoning or calls:
        raise RowError(f"{what}: reasoning and tool_call parts belong in assistant turns only")
    return text


MEDIA_KEYS = ("images", "image", "videos", "video", "audios", "audio")
MEDIA_PARTS = ("image", "image_url", "video", "video_url", "audio", "input_audio")
NO_MEDIA = "needs a vision (or audio) model, which oikyo does not support yet; remove these rows or the media"


def _part_text(p: dict, what: str) -> str:
    # OpenAI writes a part's text under "text", LLaMA-Factory v1 under "value"
    text = p.get("text", p.get("value"))
    if not isinstance(text, str):
        raise RowError(f"{what}: a {p.get('type')!r} part needs its text under 'text' or 'value'")
    return text


def _parts(value: Any, what: str) -> tuple[str, str, list]:
    """(text, reasoning, tool calls) of a turn's content: a string or a list of typed parts
    (text, reasoning/thinking, tool_call)."""
    if isinstance(value, str):
        return value, "", []
    if value is None:
        raise RowError(f"{what} is missing")
    if not isinstance(value, list):
        raise RowError(f"{what} must be a string, got {type(value).__name__}")
    text, reasoning, calls = [], [], []
    for j, p in enumerate(value):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            text.append(_part_text(p, f"{what}[{j}]"))
        elif kind in ("reasoning", "thinking"):
            reasoning.append(_part_text(p, f"{what}[{j}]"))
        elif kind == "tool_call":
            calls.append(_call(p.get("value", p.get("text")), f"{what}[{j}]"))
        elif kind in MEDIA_PARTS:
            raise RowError(f"{what}[{j}]: a {kind} part {NO_MEDIA}", kind="media")
        else:
            raise RowError(f"{what}: only text, reasoning and tool_call parts are supported, got {str(p)[:60]!r}")
    return "".join(text), "\n\n".join(reasoning), calls


def _call(value: Any, what: str) -> dict:
    """A tool_call part's call: {"name", "arguments"}, as an object or its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"{what}: tool call is not valid JSON ({e.msg})", kind="tool_call") from None
    if not isinstance(value, dict):
        raise RowError(f"{what}: tool call must be a JSON object with name and arguments", kind="tool_call")
    return value


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _split_think(content: str) -> tuple[str, str]:
    """(answer, reasoning) of an assistant text that opens with a <think>...</think> block."""
    head = content.lstrip()
    if not head.startswith(THINK_OPEN) or THINK_CLOSE not in head:
        return content, ""
    reasoning, answer = head[len(THINK_OPEN) :].split(THINK_CLOSE, 1)
    return answer.lstrip("\n"), reasoning.strip("\n")


def _train_flag(t: dict, role: str, what: str) -> bool | None:
    """Whether a turn is trained on, from its per-turn weight: LLaMA-Factory's `loss_weight`,
    axolotl's `weight` (0 masks, 1 trains) or `train` (a bool); None when the turn has none.
    The loss takes 0/1 masks only, so other weights are refused rather than rounded."""
    flag = None
    for key in ("loss_weight", "weight"):
        if key in t:
            w = t[key]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
                raise RowError(
                    f"{what}.{key}={w!r}: only 0 (masked) and 1 (trained) are supported, not fractional weights",
                    kind="loss_weight",
                )
            flag = bool(w)
    if "train" in t:
        if not isinstance(t["train"], bool):
            raise RowError(f"{what}.train must be true or false, got {t['train']!r}", kind="loss_weight")
        flag = t["train"]
    if flag and role != "assistant":
        raise RowError(
            f"{what}: only assistant turns can be trained on (set data.train_on_prompt to train prompts)",
            kind="loss_weight",
        )
    return flag


TURN_KEYS = {"loss_weight", "weight", "train", "reasoning_content", "reasoning"}


def _list(value: Any, what: str, shape: str) -> list:
    """A list, or a JSON string of one (csv/parquet cells hold nested data as JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"{what}: not a list and not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, list):
        raise RowError(f"{what} must be a list of {shape}, got {type(value).__name__}")
    return value


# row keys each format reads (beside COMMON_KEYS); any other key is reported as ignored
FORMAT_KEYS = {
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "sharegpt": {"conversations", "system"},
    "messages": {"messages", "system"},
    "trl": {"prompt", "completion"},
    "text": {"text"},
}
COMMON_KEYS = {"chosen", "rejected", "tools", "label", *MEDIA_KEYS}  # media keys: empty ones only


class _Norm:
    """Normalisation with one data config's column and role maps."""

    def __init__(self, columns: dict[str, str] | None = None, roles: dict[str, str] | None = None):
        self.row_cols = {k: v for k, v in (columns or {}).items() if k not in ("from", "value", "role", "content")}
        cols = columns or {}
        self.k_from, self.k_value = cols.get("from", "from"), cols.get("value", "value")
        self.k_role, self.k_content = cols.get("role", "role"), cols.get("content", "content")
        self.roles = {**SHAREGPT_ROLES, **(roles or {})}
        self.ignored: set[str] = set()  # keys nothing read, of the row being read

    # ---- turns -------------------------------------------------------------------------------
    def role(self, tag: Any, what: str) -> str:
        role = self.roles.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise RowError(f"{what}: unknown role tag {tag!r} (map it with data.sharegpt_roles)")
        return role

    def turn(self, role: str, content: Any, what: str, t: dict | None = None, where: str = "") -> dict:
        """One normalised turn from its role and content; `t` is the raw turn, whose per-turn
        weight and reasoning field are read too (`where` names it in reasons)."""
        reasoning = ""
        if role == FUNCTION_CALL:
            out = {"role": "assistant", "content": _call_text(content, what), "tool_call": True}
        else:
            text, reasoning, calls = _parts(content, what)
            if role != "assistant" and (reasoning or calls):
                raise RowError(f"{what}: reasoning and tool_call parts belong in assistant turns only")
            if calls and text.strip():
                raise RowError(f"{what}: assistant text together with tool calls is not supported")
            out = {"role": role, "content": text}
            if calls:
                out = {"role": role, "content": _call_text(calls[0] if len(calls) == 1 else calls, what)}
                out["tool_call"] = True
        return self.turn_extras(out, t or {}, reasoning, where or what)

    def turn_extras(self, out: dict, t: dict, reasoning: str, what: str) -> dict:
        """Reasoning (one `reasoning` text, from parts, an OpenAI/DeepSeek `reasoning_content`
        field or a leading <think> block) and a masked turn's `train: False`."""
        if out["role"] == "assistant":
            field = t.get("reasoning_content", t.get("reasoning"))
            found = [_text(field, f"{what}.reasoning_content")] if field else []
            if not out.get("tool_call"):
                out["content"], think = _split_think(out["content"])
                found.append(think)
            reasoning = "\n\n".join(r for r in [reasoning, *found] if r.strip())
            if reasoning:
                out["reasoning"] = reasoning
        # prompt turns are masked anyway: only a masked answer needs the flag
        if _train_flag(t, out["role"], what) is False and out["role"] == "assistant":
            out["train"] = False
        return out

    def note_keys(self, t: dict, used: set, what: str) -> None:
        """Remember keys of a turn that nothing reads (the manifest lists them)."""
        prefix = what.split("[")[0]
        self.ignored.update(f"{prefix}[].{k}" for k in t if k not in used and k not in TURN_KEYS)

    def sharegpt_turn(self, t: Any, what: str) -> dict:
        if isinstance(t, dict) and self.k_from in t and self.k_value in t:
            self.note_keys(t, {self.k_from, self.k_value}, what)
            return self.turn(self.role(t[self.k_from], what), t[self.k_value], f"{what}.{self.k_value}", t, what)
        if isinstance(t, dict) and self.k_role in t:  # sharegpt files that use role/content turns
            return self.message(t, what)
        raise RowError(f"{what} needs '{self.k_from}' and '{self.k_value}'")

    def message(self, m: Any, what: str) -> dict:
        if not isinstance(m, dict) or self.k_role not in m:
            raise RowError(f"{what} needs '{self.k_role}' and '{self.k_content}'")
        self.note_keys(m, {self.k_role, self.k_content, "tool_calls"}, what)
        role = self.role(m[self.k_role], what)
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant":
                raise RowError(f"{what}: only assistant messages may carry tool_calls")
            if isinstance(m.get(self.k_content), str) and m[self.k_content].strip():
                raise RowError(f"{what}: assistant text together with tool_calls is not supported")
            out = {"role": "assistant", "content": _openai_calls(calls, what), "tool_call": True}
            return self.turn_extras(out, m, "", what)
        return self.turn(role, m.get(self.k_content), f"{what}.{self.k_content}", m, what)

    # ---- formats -----------------------------------------------------------------------------
    def alpaca(self, row: dict) -> list[dict]:
        prompt = _text(row.get("instruction", ""), "instruction")
        extra = row.get("input") or ""
        if extra:
            prompt = f"{prompt}\n\n{_text(extra, 'input')}" if prompt else _text(extra, "input")
        msgs = []
        if row.get("system"):
            msgs.append({"role": "system", "content": _text(row["system"], "system")})
        for j, pair in enumerate(_list(row.get("history") or [], "history", "[user, assistant] pairs")):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise RowError(f"history[{j}] must be a [user, assistant] pair")
            msgs += [
                {"role": "user", "content": _text(pair[0], f"history[{j}][0]")},
                {"role": "assistant", "content": _text(pair[1], f"history[{j}][1]")},
            ]
        msgs.append({"role": "user", "content": prompt})
        if "chosen" not in row:
            msgs.append({"role": "assistant", "content": _text(row.get("output"), "output")})
        return msgs

    def sharegpt(self, row: dict) -> list[dict]:
        conv = _list(row.get("conversations"), "conversations", f"{{{self.k_from}, {self.k_value}}} turns")
        msgs = []
        if row.get("system"):
            msgs.append({"role": "system", "content": _text(row["system"], "system")})
        msgs += [self.sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(conv)]
        return msgs

    def messages(self, row: dict) -> list[dict]:
        raw = _list(row.get("messages"), "messages", f"{{{self.k_role}, {self.k_content}}}")
        msgs = [self.message(m, f"messages[{i}]") for i, m in enumerate(raw)]
        if row.get("system") and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": _text(row["system"], "system")})
        return msgs

    def trl(self, row: dict) -> list[dict]:
        """TRL's preference rows: `prompt` (text or messages) with `chosen`/`rejected`, or with a
        `completion` (and a KTO `label`); the answers are text or one assistant message."""
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}]
        else:
            raw = _list(prompt, "prompt", f"{{{self.k_role}, {self.k_content}}} messages")
            msgs = [self.message(m, f"prompt[{i}]") for i, m in enumerate(raw)]
        if "completion" in row:
            msgs.append(self.pref_turn(row["completion"], "completion", "trl"))
        return msgs

    def implicit_prompt(self, row: dict) -> dict:
        """A TRL pair without `prompt`: `chosen` and `rejected` are whole conversations that share
        every turn but the last; the shared turns become the prompt."""
        chosen = _list(row.get("chosen"), "chosen", "messages")
        rejected = _list(row.get("rejected"), "rejected", "messages")
        if not chosen or not rejected:
            raise RowError("chosen and rejected must each end with an assistant answer", kind="empty_turn")
        if chosen[:-1] != rejected[:-1]:
            raise RowError("chosen and rejected conversations differ before their last turn (no shared prompt)")
        return {**row, "prompt": chosen[:-1], "chosen": chosen[-1], "rejected": rejected[-1]}

    def text(self, row: dict) -> list[dict]:
        # raw text for continued pre-training: one assistant turn, trained on in full
        return [{"role": "assistant", "content": _text(row.get("text"), "text")}]

    def pref_turn(self, value: Any, what: str, fmt: str) -> dict:
        if isinstance(value, str):
            return {"role": "assistant", "content": value}
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, dict):
            raise RowError(f"{what} must be one assistant turn, got {type(value).__name__}")
        turn = self.message(value, what) if self.k_role in value else self.sharegpt_turn(value, what)
        if turn["role"] != "assistant":
            raise RowError(f"{what} must be an assistant turn, got role {turn['role']!r}")
        return turn

    def normalise(self, row: Any, fmt: str = "auto") -> tuple[list[dict], dict]:
        return self.read(row, fmt)[:2]

    def read(self, row: Any, fmt: str = "auto") -> tuple[list[dict], dict, list[str]]:
        """(messages, meta, ignored): `ignored` names the keys of the row (and of its turns,
        as ``messages[].name``) that nothing reads, so none is dropped unseen."""
        self.ignored = set()
        if not isinstance(row, dict):
            raise RowError(f"row must be a JSON object, got {type(row).__name__}")
        if self.row_cols:
            row = dict(row)
            for canon, src in self.row_cols.items():
                if src in row:
                    row[canon] = row.pop(src)
        for k in MEDIA_KEYS:
            if row.get(k):
                raise RowError(f"'{k}': a row with {k} {NO_MEDIA}", kind="media")
        fmt = detect_format(row) if fmt == "auto" else fmt
        if fmt == "trl" and "prompt" not in row and "chosen" in row:
            row = self.implicit_prompt(row)
        msgs = getattr(self, fmt)(row)
        meta: dict = {}
        if "chosen" in row or "rejected" in row:
            if "chosen" not in row or "rejected" not in row:
                raise RowError("a preference row needs both 'chosen' and 'rejected'")
            chosen = self.pref_turn(row["chosen"], "chosen", fmt)
            rejected = self.pref_turn(row["rejected"], "rejected", fmt)
            if not rejected["content"].strip():
                raise RowError("rejected: empty answer", kind="empty_turn")
            if chosen["content"].strip() == rejected["content"].strip():
                raise RowError("chosen and rejected answers are identical", kind="preference")
            msgs.append(chosen)
            meta["rejected"] = rejected
        tools = _tools(row.get("tools"))
        if tools:
            meta["tools"] = tools
        if "label" in row:
            meta["label"] = _label(row["label"])
        used = FORMAT_KEYS[fmt] | COMMON_KEYS
        self.ignored.update(k for k in row if k not in used)
        return msgs, meta, sorted(self.ignored)


def _call_text(value: Any, what: str) -> str:
    """A function call turn: keep its JSON text as the content (what the model learns to emit)."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return _text(value, what)


def _openai_calls(calls: Any, what: str) -> str:
    if not isinstance(calls, list):
        raise RowError(f"{what}.tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"{what}.tool_calls[{j}] needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise RowError(f"{what}.tool_calls[{j}].function.arguments is not valid JSON ({e.msg})") from None
        out.append({"name": fn["name"], "arguments": args})
    return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)


def _tools(value: Any) -> list:
    """The row's function schemas: a list (or its JSON text); '' and [] mean none."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"tools: invalid JSON at column {e.colno}: {e.msg}", kind="tools") from None
    if not isinstance(value, list):
        raise RowError(f"tools must be a JSON array of function schemas, got {type(value).__name__}", kind="tools")
    for j, t in enumerate(value):
        if tool_name(t) is None:
            raise RowError(f"tools[{j}] has no function name", kind="tools")
    # one shape (OpenAI's {"type": "function", "function": schema}, which files like glaive's leave
    # out and API clients always send) and one key order (sorted): training, eval and serving then
    # render the same tool as the same text, whatever the file or the client wrote
    wrapped = [
        {"type": "function", "function": t["function"] if isinstance(t.get("function"), dict) else t} for t in value
    ]
    return json.loads(json.dumps(wrapped, sort_keys=True))


def tool_name(tool: Any) -> str | None:
    """Name of a tool schema: {"name", ...} or OpenAI's {"type": "function", "function": {"name"}}."""
    if isinstance(tool, dict):
        fn: dict = tool["function"] if isinstance(tool.get("function"), dict) else tool
        if isinstance(fn.get("name"), str) and fn["name"]:
            return fn["name"]
    return None


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RowError(f"label must be true or false, got {str(value)[:40]!r}", kind="label")


def normaliser(data=None) -> _Norm:
    """A normaliser for a DataConfig (column and role maps); None gives the defaults."""
    if data is None:
        return _Norm()
    return _Norm(data.columns, data.sharegpt_roles)


def normalise(row: Any, data=None) -> tuple[list[dict], dict]:
    """(messages, meta) of one raw row under a DataConfig's format, columns and role maps."""
    return normaliser(data).normalise(row, "auto" if data is None else data.format)
