"""The shipped demo dataset: templated look-up tasks a tiny model learns in about a minute.

Run as: python -m oikyo_ray.demo.tasks   (rewrites assets/demo_tasks.jsonl and the lm-eval demo task's
         eval/assets/oikyo_demo_mc.jsonl; both files are committed)

Each answer depends only on one key word, asked in several phrasings, so a held-out phrasing of a
key seen in training is answerable: fine-tuning shows a real, measurable gain over the base.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSET = Path(__file__).parent / "assets" / "demo_tasks.jsonl"
# the same look-ups as multiple choice, for lm-evaluation-harness (eval/assets/oikyo_demo_mc.yaml)
MC_ASSET = Path(__file__).parent.parent / "eval" / "assets" / "oikyo_demo_mc.jsonl"

COLOURS_FR = {
    "red": "rouge",
    "blue": "bleu",
    "green": "vert",
    "black": "noir",
    "white": "blanc",
    "yellow": "jaune",
    "grey": "gris",
    "pink": "rose",
    "brown": "marron",
    "orange": "orange",
}
COLOURS_ES = {
    "red": "rojo",
    "blue": "azul",
    "green": "verde",
    "black": "negro",
    "white": "blanco",
    "yellow": "amarillo",
    "grey": "gris",
    "pink": "rosa",
    "brown": "marron",
    "orange": "naranja",
}
OPPOSITES = {
    "hot": "cold",
    "cold": "hot",
    "big": "small",
    "small": "big",
    "fast": "slow",
    "slow": "fast",
    "up": "down",
    "down": "up",
    "open": "closed",
    "closed": "open",
    "early": "late",
    "late": "early",
    "happy": "sad",
    "sad": "happy",
    "light": "dark",
    "dark": "light",
    "old": "new",
    "new": "old",
    "high": "low",
    "low": "high",
    "full": "empty",
    "empty": "full",
    "hard": "soft",
    "soft": "hard",
}
CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Canada": "Ottawa",
    "Chile": "Santiago",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Cuba": "Havana",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Russia": "Moscow",
}

TEMPLATES = {
    "fr": [
        "Translate to French: {k}",
        "What is {k} in French?",
        "Say {k} in French.",
        "French word for {k}?",
        "How do you say {k} in French?",
        "Give the French for {k}.",
    ],
    "es": [
        "Translate to Spanish: {k}",
        "What is {k} in Spanish?",
        "Say {k} in Spanish.",
        "Spanish word for {k}?",
        "How do you say {k} in Spanish?",
        "Give the Spanish for {k}.",
    ],
    "opp": [
        "What is the opposite of {k}?",
        "Opposite of {k}?",
        "Give the antonym of {k}.",
        "Antonym: {k}",
        "Name the opposite of {k}.",
        "The reverse of {k} is?",
    ],
    "cap": [
        "What is the capital of {k}?",
        "Capital of {k}?",
        "Name the capital city of {k}.",
        "Which city is the capital of {k}?",
        "The capital of {k} is?",
        "{k}: capital?",
    ],
}
TABLES = {"fr": COLOURS_FR, "es": COLOURS_ES, "opp": OPPOSITES, "cap": CAPITALS}
SYSTEMS = [None, "You are a helpful assistant.", "Answer with one word."]


def build_rows(seed: int = 0) -> list[dict]:
    """Every (task, key, phrasing) once, in OpenAI `messages` form, shuffled deterministically."""
    rng = random.Random(seed)
    rows = []
    for task, table in TABLES.items():
        for key, answer in table.items():
            for tmpl in TEMPLATES[task]:
                msgs = []
                system = rng.choice(SYSTEMS)
                if system:
                    msgs.append({"role": "system", "content": system})
                msgs.append({"role": "user", "content": tmpl.format(k=key)})
                msgs.append({"role": "assistant", "content": answer})
                rows.append({"messages": msgs, "task": task})
    rng.shuffle(rows)
    return rows


def build_mc_docs(per_task: int = 10, seed: int = 1) -> list[dict]:
    """`per_task` keys of each task as a question with four answers to choose from: the right one
    and three other answers of the same task, in a deterministic order."""
    rng = random.Random(seed)
    docs = []
    for task, table in TABLES.items():
        answers = sorted(set(table.values()))
        for i, key in enumerate(rng.sample(sorted(table), per_task)):
            right = table[key]
            choices = [right, *rng.sample([a for a in answers if a != right], 3)]
            rng.shuffle(choices)
            question = TEMPLATES[task][i % len(TEMPLATES[task])].format(k=key)
            docs.append({"question": question, "choices": choices, "answer": choices.index(right), "task": task})
    return docs


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    _write(ASSET, build_rows())
    _write(MC_ASSET, build_mc_docs())


if __name__ == "__main__":
    main()
