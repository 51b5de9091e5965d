"""Prompt data for RL with verifiable rewards: JSONL with ``problem`` and ``answer`` per line,
or the embedded default, a seeded set drawn from the corpus's reasoning templates (those with a
single numeric answer).

A prompt is rendered as the corpus writes its problems ("Question: ...\\nStep 1:"), so a model
pre-trained on the quickstart corpus continues it with worked steps and an "Answer:" line.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import List

from megatron_looprpt.data.corpus import REASONING_TEMPLATES
from megatron_looprpt.rl.verifier import parse_number
from megatron_looprpt.rl.verifier import reward as verify


@dataclass(frozen=True)
class PromptProblem:
    problem: str
    answer: str

    def render(self) -> str:
        return f"Question: {self.problem}\nStep 1:"

    # what the token-level RL step asks of a problem (rl/grpo.py)
    def prompt_tokens(self, tokenizer) -> List[int]:
        return tokenizer.tokenize(self.render())

    def answer_text(self, tokenizer, tokens: List[int]) -> str:
        return tokenizer.detokenize(tokens)

    def reward(self, text: str) -> float:
        return verify(text, self.answer)


def read_problems(path: str) -> List[PromptProblem]:
    """Problems from a JSONL file; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompt-data {path} does not exist")
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems.append(PromptProblem(str(row["problem"]), str(row["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--prompt-data {path} line {number}: expected a JSON object with "
                                 '"problem" and "answer"') from None
    if not problems:
        raise ValueError(f"--prompt-data {path} holds no problems")
    return problems


def generate_problems(num: int, seed: int = 4321) -> List[PromptProblem]:
    """``num`` arithmetic and word problems with numeric answers (the corpus's templates, drawn
    with another seed than the pre-training corpus so they are not its problems verbatim)."""
    rng = random.Random(seed)
    problems: List[PromptProblem] = []
    while len(problems) < num:
        question, _, answer = rng.choice(REASONING_TEMPLATES)(rng)
        if parse_number(answer) is not None:
            problems.append(PromptProblem(question, answer))
    return problems


def write_problems(path: str, problems: List[PromptProblem]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"problem": p.problem, "answer": p.answer}) + "\n")
