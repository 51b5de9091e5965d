"""The math verifier and the prompt data of RL with verifiable rewards."""

import importlib.util
import json
import random

import pytest

from megatron_looprpt.data.corpus import REASONING_TEMPLATES
from megatron_looprpt.data.prompts import PromptProblem, generate_problems, read_problems, write_problems
from megatron_looprpt.rl.verifier import extract_answer, is_correct, parse_number, reward, reward_function

CORRECT = [
    ("so the total is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}} no wait \\boxed{7/2}", "3.5"),
    ("Step 1: 3 * 4 = 12\nAnswer: 12", "12"),
    ("The answer is $1,250.", "1250"),
    ("#### 17", "17"),
    ("... giving 80 km in total", "80 km"),
    ("Answer: $19\nQuestion: next one", "$19"),
    ("first 3, then 5, finally 9", "9"),
    ("Answer: Grace", "grace"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{-\\dfrac{3}{4}}", "-0.75"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{5\\%}", "5%"),
    ("The answer is: 5", "5"),
    ("Answer: x = 5", "5"),
    ("Answer: $-5", "-5"),
    ("Answer: $12$", "12"),
]
WRONG = [
    ("\\boxed{41}", "42"),
    ("Answer: 12\nStep 2: 13", "13"),        # the marked answer wins over a later number
    ("no numbers here", "3"),
    ("\\boxed{12", "12"),                    # cut off inside the box: no answer, not the last number
    ("Answer: 3 + 4", "7"),                 # an expression is not a number
    ("Answer: 2 boxes, 1 left over", "2"),
    ("Answer: 1,2", "12"),                  # not a thousands separator
    ("Answer: 1,2345", "12345"),
]
# Where the backends judge alike the same case differently (see rl/verifier.py): (completion,
# reference) -> (builtin, math-verify)
DIFFERENT = {
    ("\\boxed{\\frac{1}{2}} no wait \\boxed{7/2}", "3.5"): (1.0, 0.0),   # the last box vs the first
    ("Answer: Grace", "grace"): (1.0, 0.0),                                 # text answers
    ("Answer: 3 + 4", "7"): (0.0, 1.0),                                     # an expression, evaluated
    ("Answer: 2 boxes, 1 left over", "2"): (0.0, 1.0),                      # a multi-part answer
}
BACKENDS = ["builtin", pytest.param("math-verify", marks=pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None, reason="math-verify is not installed (the rl extra)"))]


@pytest.mark.parametrize("completion, answer", CORRECT)
def test_correct_answers(completion, answer):
    assert is_correct(completion, answer) and reward(completion, answer) == 1.0


@pytest.mark.parametrize("completion, answer", WRONG)
def test_wrong_or_missing_answers(completion, answer):
    assert not is_correct(completion, answer) and reward(completion, answer) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_verifiers_on_the_same_cases(backend):
    verify = reward_function(backend)
    column = VERIFIER_COLUMN[backend]
    for (completion, answer), expected in DIFFERENT.items():
        assert verify(completion, answer) == expected[column], (backend, completion, answer)
    for completion, answer in CORRECT:
        if (completion, answer) not in DIFFERENT:
            assert verify(completion, answer) == 1.0, (backend, completion, answer)
    for completion, answer in WRONG:
        if (completion, answer) not in DIFFERENT:
            assert verify(completion, answer) == 0.0, (backend, completion, answer)


VERIFIER_COLUMN = {"builtin": 0, "math-verify": 1}


def test_answer_extraction_and_number_parsing():
    assert extract_answer("a \\boxed{x^{2}} b") == "x^{2}"
    assert extract_answer("nothing") is None
    assert parse_number("1,234.5") == parse_number("2469/2")
    assert parse_number("15%") == 15 and parse_number("-3") == -3 and parse_number("\\$12") == 12
    assert parse_number("abc") is None and parse_number("4 5") is None


def test_prompt_data(tmp_path):
    problems = generate_problems(300, seed=1)
    assert len(problems) == 300 and generate_problems(300, seed=1) == problems
    assert all(parse_number(p.answer) is not None for p in problems)
    assert len({p.problem.split()[0] for p in problems}) > 3  # several templates
    # every template's reference answer is the last number of its worked steps
    rng = random.Random(0)
    for template in REASONING_TEMPLATES:
        for _ in range(20):
            question, steps, answer = template(rng)
            if parse_number(answer) is not None:
                assert is_correct(steps[-1], answer), (template.__name__, steps[-1], answer)
    path = tmp_path / "p.jsonl"
    write_problems(str(path), problems[:5])
    assert read_problems(str(path)) == problems[:5]
    assert PromptProblem("What is 2+2?", "4").render() == "Question: What is 2+2?\nStep 1:"
    path.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1: expected a JSON object with \"problem\" and \"answer\""):
        read_problems(str(path))
    with pytest.raises(FileNotFoundError, match="--prompt-data"):
        read_problems(str(tmp_path / "missing.jsonl"))
