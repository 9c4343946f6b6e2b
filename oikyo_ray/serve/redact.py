"""Redaction of captured text (Ray-free): e-mail addresses, phone numbers, card numbers and
keys/tokens become placeholders before anything is written.

    redact("mail me at ana@example.org") -> "mail me at [EMAIL]"

Patterns err on the side of removing: a captured row that lost a number it did not need costs
less than a key or an address kept in a training set. `load_redactor("pkg.mod:fn")` adds a
function of the user's (str -> str), run after the built-in patterns.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

# keys and tokens first: their bodies would otherwise be read as phone or card digits
SECRETS = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S), "[SECRET]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), "[SECRET]"),  # JWT
    (re.compile(r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_-]{16,}"), "[SECRET]"),  # OpenAI/Stripe-style
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), "[SECRET]"),  # Hugging Face
    (re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr|github_pat)_[A-Za-z0-9_]{20,}"), "[SECRET]"),  # GitHub
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), "[SECRET]"),  # Slack
    (re.compile(r"\bA(?:KIA|SIA)[0-9A-Z]{16}\b"), "[SECRET]"),  # AWS access key id
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), "[SECRET]"),  # Google API key
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{12,}"), r"\1[SECRET]"),
    # key=value, key: value, "key is value" where the key says what it is: the key stays
    (
        re.compile(
            r"(?i)\b((?:api[_-]?key|access[_-]?key|secret(?:[_-]?key)?|token|password|passwd|pwd)"
            r"(?:\s*[:=]\s*|\s+is\s+)[\"']?)[^\s\"',;]{6,}"
        ),
        r"\1[SECRET]",
    ),
]
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# 13-19 digits with optional single spaces or dashes between groups; kept only if Luhn-valid
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
# an optional +country code, then 7-15 digits in groups split by spaces, dots, dashes or brackets
PHONE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){1,4}(?![\w-])")
DATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn(digits) else m.group()


def _phone(m: re.Match) -> str:
    text = m.group()
    digits = re.sub(r"\D", "", text)
    # a bare run of digits is a number, not a phone, unless it is written like one (+, brackets,
    # separators); years and small counts never reach 7 digits
    looks_like = text.startswith("+") or "(" in text or re.search(r"\d[\s.-]\d", text)
    return "[PHONE]" if 7 <= len(digits) <= 15 and looks_like and not DATE.fullmatch(text) else text


def redact(text: str) -> str:
    """`text` with secrets, e-mail addresses, card numbers and phone numbers replaced."""
    for pattern, placeholder in SECRETS:
        text = pattern.sub(placeholder, text)
    text = EMAIL.sub("[EMAIL]", text)
    text = CARD.sub(_card, text)
    return PHONE.sub(_phone, text)


def load_redactor(path: str | None) -> Callable[[str], str]:
    """The built-in redaction, followed by the function at `path` ("package.module:function")."""
    if not path:
        return redact
    module, _, name = path.partition(":")
    extra = getattr(importlib.import_module(module), name)

    def both(text: str) -> str:
        return str(extra(redact(text)))

    return both
