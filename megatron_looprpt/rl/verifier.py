"""Verifiable rewards for math answers: extract the final answer of a completion and compare it
with the reference numerically.

The final answer of a completion is, in order of preference: the content of its last
``\\boxed{...}`` (braces balanced; a box cut off by the length limit is no answer), the text
after its last "Answer:" / "answer is" / "####" marker (to the end of that line), or else its
last number. Two answers match when both parse as numbers and are equal, or otherwise when their
normalised text is equal. Numbers may carry thousands separators in groups of three ("1,250";
"1,2" is not a number), a $ before or after the sign, a trailing unit word or %, a fraction a/b
or LaTeX's \frac{a}{b}, math delimiters ($...$) and a "x =" in front.

``--answer-verifier math-verify`` uses Hugging Face's math-verify instead (the ``rl`` extra),
the maintained verifier of open RL stacks: it parses both answers to sympy and compares them
symbolically. The two differ on purpose in what they accept (tests/test_verifiable_rewards.py
lists the cases): math-verify evaluates expressions ("Answer: 3 + 4" is 7), takes the first of
several boxes, reads "2 boxes, 1 left over" as 2 and does not compare text answers; this
module refuses expressions and multi-part answers, takes the last box and compares text.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable, Optional

_SIGN = r"(?:-\$?|\$-?)?"                      # -5, -$5, $-5, $5
_NUMBER = re.compile(_SIGN + r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)(?![\d,]*\d)")
_MARKERS = re.compile(r"(?:answer\s*(?:is\s*:?|:)|####)\s*", re.IGNORECASE)
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\w*\s*=\s*")   # "x = 5"


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
    cleaned = text.strip().rstrip(".").replace("\\$", "$").replace("{,}", ",").replace("\\%", "%")
    if len(cleaned) > 2 and cleaned[0] == cleaned[-1] == "$" and cleaned.count("$") == 2:
        cleaned = cleaned[1:-1].strip()              # $...$: math delimiters, not dollars
    cleaned = re.sub(r"^\\text\{(.*)\}$", r"\1", cleaned)
    cleaned = _LATEX_FRACTION.sub(r"\1/\2", _ASSIGNMENT.sub("", cleaned))
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


VERIFIERS = ("builtin", "math-verify")


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ImportError("--answer-verifier math-verify needs the math-verify package: "
                          "pip install -e .[rl] (or pip install math-verify)") from None
    return math_verify


def math_verify_reward(completion: str, reference: str) -> float:
    """math-verify's judgement: 1.0 when the completion's answer equals the reference's."""
    math_verify = _math_verify()
    gold, answer = math_verify.parse(reference), math_verify.parse(completion)
    return 1.0 if gold and answer and math_verify.verify(gold, answer) else 0.0


def reward_function(name: str) -> Callable[[str, str], float]:
    """reward(completion, reference) of a --answer-verifier backend (math-verify imported now,
    so a missing package fails before any work)."""
    if name == "builtin":
        return reward
    if name == "math-verify":
        _math_verify()
        return math_verify_reward
    raise ValueError(f"--answer-verifier {name}: choose one of {', '.join(VERIFIERS)}")
