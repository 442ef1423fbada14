"""House rules checked on every generated reply (sentence count, required and forbidden phrases, …)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ftkit.core.config import RulesConfig

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def count_sentences(text: str) -> int:
    """Sentences in ``text``: runs of . ! ? followed by whitespace or the end; trailing text counts one."""
    text = text.strip()
    if not text:
        return 0
    ends = list(_SENTENCE_END.finditer(text))
    tail = text[ends[-1].end():].strip() if ends else text
    return len(ends) + (1 if tail else 0)


@dataclass
class RuleResult:
    passed: bool
    failures: list[str]


def check_rules(reply: str, prompt_text: str, rules: RulesConfig) -> RuleResult:
    """Check one reply against the configured house-style rules."""
    failures = []
    body = reply
    for phrase in rules.ignore_for_sentences:
        body = body.replace(phrase, " ")
    if rules.max_sentences is not None and count_sentences(body) > rules.max_sentences:
        failures.append(f"more than {rules.max_sentences} sentences ({count_sentences(body)})")
    for phrase in rules.required_phrases:
        if phrase not in reply:
            failures.append(f"missing required phrase {phrase!r}")
    for pattern in rules.must_match:
        if not re.search(pattern, reply):
            failures.append(f"does not match /{pattern}/")
    for pattern in rules.must_not_match:
        if re.search(pattern, reply):
            failures.append(f"matches forbidden /{pattern}/")
    if rules.echo_pattern:
        for wanted in re.findall(rules.echo_pattern, prompt_text):
            if wanted not in reply:
                failures.append(f"does not repeat {wanted!r} from the prompt")
    return RuleResult(not failures, failures)


def has_rules(rules: RulesConfig) -> bool:
    return bool(rules.max_sentences is not None or rules.required_phrases or rules.must_match
                or rules.must_not_match or rules.echo_pattern)
