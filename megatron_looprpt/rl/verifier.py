"""Verifiable rewards for math answers: extract the final answer of a completion and compare it
with the reference numerically.

The final answer of a completion is, in order of preference: the content of its last
``\\boxed{...}`` (braces balanced; a box cut off by the length limit is no answer), the text
after its last "Answer:" / "answer is" / "####" marker (to the end of that line), or else its
last number. Two answers match when both parse as numbers (thousands separators, a leading $, a
trailing unit word or %, fractions a/b and decimals allowed) and are equal, or otherwise when
their normalised text is equal.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+")
_MARKERS = re.compile(r"(?:answer\s*(?:is|:)|####)\s*", re.IGNORECASE)


def last_boxed(text: str) -> Optional[str]:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the answer was cut off


def extract_answer(completion: str) -> Optional[str]:
    """The completion's final answer as text, or None if it gives none."""
    if "\\boxed{" in completion:
        boxed = last_boxed(completion)
        return None if boxed is None else boxed.strip()  # a box cut off holds no answer
    markers = list(_MARKERS.finditer(completion))
    if markers:
        rest = completion[markers[-1].end():].splitlines()
        if rest and rest[0].strip():
            return rest[0].strip()
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Optional[Fraction]:
    """A number written as the answer, or None: "1,234", "$12", "-3.5", "7/2", "42 km", "15%"."""
    cleaned = text.strip().rstrip(".").replace("\\$", "$")
    cleaned = re.sub(r"^\\text\{(.*)\}$", r"\1", cleaned)
    match = _NUMBER.match(cleaned)
    if match is None:
        return None
    rest = cleaned[match.end():].strip()
    if rest and not re.fullmatch(r"%|[A-Za-z][A-Za-z ]*", rest):
        return None  # "3 + 4", "2 boxes, 1 left over": not a single number
    number = match.group().replace("$", "").replace(",", "")
    try:
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().rstrip(".").lower())


def is_correct(completion: str, reference: str) -> bool:
    answer = extract_answer(completion)
    if answer is None:
        return False
    got, want = parse_number(answer), parse_number(reference)
    if got is not None and want is not None:
        return got == want
    return _normalise(answer) == _normalise(reference)


def reward(completion: str, reference: str) -> float:
    """1.0 for a correct final answer, else 0.0."""
    return 1.0 if is_correct(completion, reference) else 0.0
