"""Normalise a raw row (alpaca, sharegpt, OpenAI messages, TRL, raw text) into one `messages` schema.

    normalise(row, data_cfg) -> (messages, meta)

`messages` is ``[{"role", "content"}]`` with roles system/user/assistant/tool; an assistant turn
that calls a function also carries ``"tool_call": True`` and its content is the call as JSON
(``{"name", "arguments"}``, or a list of them). `meta` keeps what is not a turn but belongs to the
example: ``tools`` (list of function schemas), ``label`` (KTO, bool) and ``rejected`` (the
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
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI typed parts: [{"type": "text", "text": ...}]
        parts = []
        for p in value:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise RowError(f"{what}: only text parts are supported, got {str(p)[:60]!r}")
        return "".join(parts)
    if value is None:
        raise RowError(f"{what} is missing")
    raise RowError(f"{what} must be a string, got {type(value).__name__}")


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


class _Norm:
    """Normalisation with one data config's column and role maps."""

    def __init__(self, columns: dict[str, str] | None = None, roles: dict[str, str] | None = None):
        self.row_cols = {k: v for k, v in (columns or {}).items() if k not in ("from", "value", "role", "content")}
        cols = columns or {}
        self.k_from, self.k_value = cols.get("from", "from"), cols.get("value", "value")
        self.k_role, self.k_content = cols.get("role", "role"), cols.get("content", "content")
        self.roles = {**SHAREGPT_ROLES, **(roles or {})}

    # ---- turns -------------------------------------------------------------------------------
    def role(self, tag: Any, what: str) -> str:
        role = self.roles.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise RowError(f"{what}: unknown role tag {tag!r} (map it with data.sharegpt_roles)")
        return role

    def turn(self, role: str, content: Any, what: str) -> dict:
        if role == FUNCTION_CALL:
            return {"role": "assistant", "content": _call_text(content, what), "tool_call": True}
        return {"role": role, "content": _text(content, what)}

    def sharegpt_turn(self, t: Any, what: str) -> dict:
        if isinstance(t, dict) and self.k_from in t and self.k_value in t:
            return self.turn(self.role(t[self.k_from], what), t[self.k_value], f"{what}.{self.k_value}")
        if isinstance(t, dict) and self.k_role in t:  # sharegpt files that use role/content turns
            return self.message(t, what)
        raise RowError(f"{what} needs '{self.k_from}' and '{self.k_value}'")

    def message(self, m: Any, what: str) -> dict:
        if not isinstance(m, dict) or self.k_role not in m:
            raise RowError(f"{what} needs '{self.k_role}' and '{self.k_content}'")
        role = self.role(m[self.k_role], what)
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant":
                raise RowError(f"{what}: only assistant messages may carry tool_calls")
            if isinstance(m.get(self.k_content), str) and m[self.k_content].strip():
                raise RowError(f"{what}: assistant text together with tool_calls is not supported")
            return {"role": "assistant", "content": _openai_calls(calls, what), "tool_call": True}
        return self.turn(role, m.get(self.k_content), f"{what}.{self.k_content}")

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
        if not isinstance(row, dict):
            raise RowError(f"row must be a JSON object, got {type(row).__name__}")
        if self.row_cols:
            row = dict(row)
            for canon, src in self.row_cols.items():
                if src in row:
                    row[canon] = row.pop(src)
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
        return msgs, meta


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
