"""A retrain's dataset from a model's own traffic (Ray-free): captured answers joined with the
feedback on them become training rows in the formats the data stage reads, beside a replay of
the champion's prepared data; the whole of it then goes through the normal curation.

    parts = build(completions, feedback, champion_data_dir, cfg.retrain, redactor)
    files = write(parts, store.join(root, "retrain", model, stamp, "data"))

- SFT rows (`retrain.objective=sft`): a corrected answer (the correction), or an answer whose every
  rating is at least `good_score` (the answer as given).
- Preference pairs (`dpo`): a correction over the answer it corrects; an answer over the one it
  was preferred to (same prompt); a well-rated over a badly-rated answer to the same prompt.
- Held out: `live_eval_fraction` of the prompts (by hash, so one prompt never lies on both sides)
  are the live slice the challenger is judged on; they are not trained on.
- Redaction check: a row whose text the capture's redactor would still change is dropped (counted):
  nothing unredacted is trained on, e.g. traffic captured with serve.capture.redact off.
- Replay: `replay_fraction` of the champion's training rows (seeded) and all of its val and test
  rows, written back in their normalised form: their content hash, hence their split, is unchanged,
  so the retrain's test split is the champion's test split and the curation's leakage check holds
  the new rows against it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from oikyo_ray.config import RetrainConfig
from oikyo_ray.data.prepared import load_split_rows
from oikyo_ray.runs import store

SPLITS = ("train", "val", "test")


@dataclass
class Parts:
    """The rows of a retrain's dataset, by file, and what became of every captured answer."""

    live: list[dict] = field(default_factory=list)  # trained on (SFT rows or pairs)
    live_eval: list[dict] = field(default_factory=list)  # the held-out live slice (same shape)
    replay: list[dict] = field(default_factory=list)  # the champion's rows
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def summary(self) -> dict:
        return {
            "live_rows": len(self.live),
            "live_eval_rows": len(self.live_eval),
            "replay_rows": len(self.replay),
            **dict(sorted(self.counts.items())),
        }


def prompt_messages(row: dict) -> list[dict] | None:
    """A captured prompt as conversation turns: chat prompts are their messages; a completions
    prompt is one user turn (as TRL reads prompt/completion rows). None: not readable."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return None
    if row.get("endpoint") != "chat":
        return [{"role": "user", "content": prompt}]
    try:
        msgs = json.loads(prompt)
    except json.JSONDecodeError:
        return None  # cut at serve.capture.max_chars
    ok = isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m for m in msgs)
    return msgs if ok else None


def _key(msgs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(msgs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def held_out(prompt_key: str, fraction: float) -> bool:
    return int(prompt_key[:15], 16) / 16**15 < fraction


def _texts(row: dict) -> list[str]:
    out = [row.get("completion"), row.get("correction")]
    return [t for t in out if isinstance(t, str)] + [str(row.get("prompt") or "")]


@dataclass
class Answer:
    """One captured answer with what users said of it."""

    id: str
    prompt: list[dict]
    text: str
    ratings: list[float] = field(default_factory=list)
    corrections: list[str] = field(default_factory=list)
    beats: list[str] = field(default_factory=list)  # ids of answers this one was preferred over


def answers(completions: list[dict], feedback: list[dict], redactor: Callable[[str], str] | None, counts) -> dict:
    """id -> Answer for every captured answer with a prompt and a text, feedback attached."""
    out: dict[str, Answer] = {}
    for row in completions:
        msgs = prompt_messages(row)
        text = row.get("completion")
        if msgs is None or not isinstance(text, str) or not text.strip():
            counts["skipped_no_text"] += 1  # capture.fields without prompt/completion, or a cut prompt
            continue
        if redactor is not None and any(redactor(t) != t for t in _texts(row)):
            counts["dropped_redaction"] += 1
            continue
        out[row["id"]] = Answer(row["id"], msgs, text)
    for fb in sorted(feedback, key=lambda r: r.get("created") or 0):
        a = out.get(str(fb.get("id")))
        if a is None:
            counts["feedback_unmatched"] += 1  # its answer was not captured (sample_rate) or is too old
            continue
        if redactor is not None and any(redactor(t) != t for t in _texts(fb) if t):
            counts["dropped_redaction"] += 1
            continue
        if fb.get("normalized") is not None:
            a.ratings.append(float(fb["normalized"]))
        if isinstance(fb.get("correction"), str) and fb["correction"].strip():
            a.corrections.append(fb["correction"])
        if fb.get("preferred_over"):
            a.beats.append(fb["preferred_over"])
    return out


def sft_rows(found: dict[str, Answer], good: float, counts) -> list[dict]:
    rows = []
    for a in found.values():
        if a.corrections:
            rows.append({"messages": [*a.prompt, {"role": "assistant", "content": a.corrections[-1]}]})
            counts["sft_from_correction"] += 1
        elif a.ratings and min(a.ratings) >= good:
            rows.append({"messages": [*a.prompt, {"role": "assistant", "content": a.text}]})
            counts["sft_from_rating"] += 1
    return rows


def pair_rows(found: dict[str, Answer], good: float, counts) -> list[dict]:
    def pair(prompt, chosen: str, rejected: str, why: str) -> dict | None:
        if chosen.strip() == rejected.strip():
            return None
        counts[f"pairs_from_{why}"] += 1
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    rows = []
    for a in found.values():
        if a.corrections:
            rows.append(pair(a.prompt, a.corrections[-1], a.text, "correction"))
        for other in a.beats:
            b = found.get(other)
            if b is None or _key(b.prompt) != _key(a.prompt):
                counts["comparison_other_prompt"] += 1  # no pair without one prompt to both answers
                continue
            rows.append(pair(a.prompt, a.text, b.text, "comparison"))
    by_prompt: dict[str, list[Answer]] = defaultdict(list)
    for a in found.values():
        if a.ratings:
            by_prompt[_key(a.prompt)].append(a)
    for group in by_prompt.values():
        liked = [a for a in group if min(a.ratings) >= good]
        disliked = [a for a in group if max(a.ratings) <= 1 - good]
        for a, b in zip(liked, disliked):
            rows.append(pair(a.prompt, a.text, b.text, "ratings"))
    return [r for r in rows if r is not None]


def replay_rows(data_dir: Path, objective: str, fraction: float, seed: int, counts) -> list[dict]:
    """The champion's prepared rows in a form the data stage reads back to the same content."""
    out = []
    for split in SPLITS:
        rows = load_split_rows(data_dir, split)
        if split == "train" and fraction < 1:
            rows = random.Random(seed).sample(rows, round(len(rows) * fraction))
        for r in rows:
            row = _readable(json.loads(r["messages"]), json.loads(r.get("meta") or "{}"), objective)
            if row is None:
                counts[f"replay_skipped_not_{objective}"] += 1
                continue
            out.append(row)
            counts[f"replay_{split}"] += 1
    return out


def _readable(msgs: list[dict], meta: dict, objective: str) -> dict | None:
    extra = {"tools": meta["tools"]} if meta.get("tools") else {}
    if objective == "dpo":
        if "rejected" not in meta:
            return None
        return {"prompt": msgs[:-1], "chosen": msgs[-1], "rejected": meta["rejected"], **extra}
    if "rejected" in meta or meta.get("label") is False:
        return None  # an SFT replay trains on the chosen answers of pairs only via their own rows
    return {"messages": msgs, **extra}


def build(
    completions: list[dict],
    feedback: list[dict],
    champion_data: Path,
    cfg: RetrainConfig,
    redactor: Callable[[str], str] | None,
    seed: int = 0,
) -> Parts:
    parts = Parts()
    found = answers(completions, feedback, redactor, parts.counts)
    parts.counts["captured_answers"] = len(completions)
    make = pair_rows if cfg.objective == "dpo" else sft_rows
    rows = make(found, cfg.good_score, parts.counts)
    for row in rows:
        prompt = row["prompt"] if "prompt" in row else row["messages"][:-1]
        (parts.live_eval if held_out(_key(prompt), cfg.live_eval_fraction) else parts.live).append(row)
    parts.replay = replay_rows(champion_data, cfg.objective, cfg.replay_fraction, seed, parts.counts)
    return parts


def write(parts: Parts, dest: str) -> dict[str, str]:
    """One JSON-lines file per part under `dest` (local or s3://): name -> path."""
    files = {}
    for name, rows in (("live", parts.live), ("live_eval", parts.live_eval), ("replay", parts.replay)):
        if not rows:
            continue
        path = store.join(dest, f"{name}.jsonl")
        store.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        files[name] = path
    return files
