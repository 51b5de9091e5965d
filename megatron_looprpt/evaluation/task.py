"""Answer accuracy on a prompt/completion task, per loop step and per group (e.g. hops k).

Problems come from JSONL records ``{"prompt": ..., "completion": ..., <group key>: ...}`` (the
format ``data/composition.py`` writes). They are packed into rows of ``seq_length`` tokens the
way training packs documents (prompt + completion + eod, one after the other, no problem split
across rows), so a problem is seen in the context it was trained in. A problem counts as solved
at loop step t when every completion token is step t's prediction; with Q-exit, when every
completion token is right at its own exit step. The sums travel through the same pipeline
schedules and reductions as the other metrics, so every layout gives the same numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_looprpt.arguments import ConfigError
from megatron_looprpt.data.datasets import prompt_completion_ids
from megatron_looprpt.models.exit_gate import exit_distribution, q_exit_steps


@dataclass
class TaskProblem:
    prompt: List[int]
    answer: List[int]
    group: int          # index into TaskSet.groups


@dataclass
class TaskSet:
    problems: List[TaskProblem]
    groups: List[str]   # the group values, sorted (numerically where they are numbers)
    group_key: str
    path: str


def _sort_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def read_task(path: str, tokenizer, group_key: str = "k") -> TaskSet:
    """Tokenize every problem of ``path``; a record without ``group_key`` is in group "all"."""
    if not os.path.isfile(path):
        raise ConfigError(f"--task-data {path} does not exist (write one with data/composition.py, "
                          "or give prompt/completion JSONL)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"--task-data {path}:{line_no} is not JSON ({error.msg})") from None
            missing = [key for key in ("prompt", "completion") if key not in record]
            if missing:
                raise ConfigError(f"--task-data {path}:{line_no} has no {missing[0]!r} field "
                                  "(records are {\"prompt\": ..., \"completion\": ...})")
            records.append((record["prompt"], record["completion"], str(record.get(group_key, "all"))))
    if not records:
        raise ConfigError(f"--task-data {path} holds no problems")
    groups = sorted({group for _, _, group in records}, key=_sort_key)
    index = {group: i for i, group in enumerate(groups)}
    problems = []
    for prompt, completion, group in records:
        # as preprocess_jsonl(prompt_key=...) wrote the training documents
        prompt_ids, answer = prompt_completion_ids(tokenizer, prompt, completion)
        if not answer:
            raise ConfigError(f"--task-data {path}: the completion {completion!r} tokenizes to nothing")
        problems.append(TaskProblem(prompt_ids, answer, index[group]))
    return TaskSet(problems, groups, group_key, path)


@dataclass
class PackedRow:
    tokens: List[int]                 # seq_length + 1 ids (input and shifted labels)
    answers: List[tuple]              # (label positions, group) per problem in the row


def pack_rows(task: TaskSet, seq_length: int, eod: int) -> List[PackedRow]:
    rows, tokens, answers = [], [], []
    for problem in task.problems:
        document = problem.prompt + problem.answer + [eod]
        if len(document) > seq_length + 1:
            raise ConfigError(f"--task-data {task.path}: a problem of {len(document)} tokens does not fit "
                              f"--seq-length {seq_length}")
        if len(tokens) + len(document) > seq_length + 1:
            rows.append(PackedRow(tokens + [eod] * (seq_length + 1 - len(tokens)), answers))
            tokens, answers = [], []
        first = len(tokens) + len(problem.prompt)
        # the label at position i is token i + 1, so answer token j is the label at j - 1
        answers.append((list(range(first - 1, first - 1 + len(problem.answer))), problem.group))
        tokens = tokens + document
    rows.append(PackedRow(tokens + [eod] * (seq_length + 1 - len(tokens)), answers))
    return rows


def _micro_batch(rows: Sequence[Optional[PackedRow]], seq_length: int) -> Dict[str, torch.Tensor]:
    """Rows (None: padding) -> tokens, labels, loss_mask (answer labels), position_ids, and
    answer_problem (which of the micro-batch's problems a label belongs to, -1: none) with
    problem_group (the group of each problem, -1: none)."""
    tokens = torch.zeros(len(rows), seq_length + 1, dtype=torch.long)
    answer_problem = torch.full((len(rows), seq_length), -1, dtype=torch.long)
    groups = []
    for r, row in enumerate(rows):
        if row is None:
            continue
        tokens[r] = torch.tensor(row.tokens)
        for positions, group in row.answers:
            answer_problem[r, positions] = len(groups)
            groups.append(group)
    max_problems = seq_length * len(rows)   # a fixed size, so every micro-batch reduces alike
    problem_group = torch.full((max_problems,), -1, dtype=torch.long)
    problem_group[: len(groups)] = torch.tensor(groups, dtype=torch.long)
    return {
        "tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
        "loss_mask": (answer_problem >= 0).float(),
        "position_ids": torch.arange(seq_length).expand(len(rows), -1).contiguous(),
        "answer_problem": answer_problem, "problem_group": problem_group,
    }


def global_batches(rows: List[PackedRow], seq_length: int, micro_batch_size: int, num_microbatches: int,
                   device: torch.device) -> List[List[Dict[str, torch.Tensor]]]:
    """This data-parallel rank's micro-batches of every global batch; the last global batch is
    padded with empty rows so that all ranks run the same number of schedules."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    per_global = micro_batch_size * dp * num_microbatches
    padded = rows + [None] * (-len(rows) % per_global)
    result = []
    for start in range(0, len(padded), per_global):
        chunk = padded[start:start + per_global]
        micro = []
        for m in range(num_microbatches):
            # the same interleaving as training: micro-batch m of rank r is a contiguous slice
            first = (m * dp + rank) * micro_batch_size
            batch = _micro_batch(chunk[first:first + micro_batch_size], seq_length)
            micro.append({name: value.to(device) for name, value in batch.items()})
        result.append(micro)
    return result


def task_sums(batch: Dict[str, torch.Tensor], predictions: torch.Tensor, label_logprobs: torch.Tensor,
              gate_logits: torch.Tensor, num_groups: int, exit_threshold: float) -> Dict[str, torch.Tensor]:
    """Sums of one micro-batch: solved problems per group and step [G, T], answer NLL per group
    and step [G, T], problems per group [G], and at Q-exit: solved [G] and loop steps [G]."""
    num_steps = predictions.shape[0]
    owner = batch["answer_problem"]
    group_of = batch["problem_group"]
    num_problems = group_of.numel()
    counted = owner >= 0
    slot = torch.where(counted, owner, torch.zeros_like(owner)).reshape(-1)
    correct = (predictions == batch["labels"].unsqueeze(0)).float().reshape(num_steps, -1)
    exit_probs = exit_distribution(gate_logits.double())
    exit_step = q_exit_steps(exit_probs, exit_threshold)                              # [b, s]
    exit_correct = correct.reshape(num_steps, *owner.shape).gather(0, exit_step.unsqueeze(0)).reshape(-1)
    weight = counted.reshape(-1).float()

    def per_problem_min(values: torch.Tensor) -> torch.Tensor:
        # a problem is solved when its least-correct token is correct; uncounted positions are 1
        values = torch.where(weight > 0, values, torch.ones_like(values))
        out = torch.ones(num_problems, dtype=values.dtype, device=values.device)
        return out.scatter_reduce(0, slot, values, reduce="amin")

    def per_problem_sum(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(num_problems, dtype=values.dtype, device=values.device)
        return out.scatter_add(0, slot, values * weight)

    solved = torch.stack([per_problem_min(correct[t]) for t in range(num_steps)], dim=1)       # [P, T]
    nll = -label_logprobs.float().reshape(num_steps, -1)
    problem_nll = torch.stack([per_problem_sum(nll[t]) for t in range(num_steps)], dim=1)     # [P, T]
    exit_solved = per_problem_min(exit_correct)
    exit_steps = per_problem_sum((exit_step + 1).reshape(-1).float())
    tokens = per_problem_sum(torch.ones_like(weight))
    one_hot = torch.nn.functional.one_hot(group_of.clamp_min(0), num_groups).float()
    one_hot = one_hot * (group_of >= 0).float().unsqueeze(1)                                  # [P, G]
    return {
        "task_problems": one_hot.sum(dim=0),
        "task_solved": one_hot.t() @ solved,
        "task_nll": one_hot.t() @ problem_nll,
        "task_exit_solved": one_hot.t() @ exit_solved,
        # mean loop steps over a problem's answer tokens, summed over problems
        "task_exit_steps": one_hot.t() @ (exit_steps / tokens.clamp_min(1.0)),
    }


def summarize_task(totals: Dict[str, torch.Tensor], task: TaskSet, num_steps: int, exit_threshold: float) -> dict:
    """Accuracies per group and step (and over every problem) from reduced sums."""
    problems = totals["task_problems"].double().reshape(-1)
    solved = totals["task_solved"].double().reshape(len(task.groups), num_steps)
    nll = totals["task_nll"].double().reshape(len(task.groups), num_steps)
    exit_solved = totals["task_exit_solved"].double().reshape(-1)
    exit_steps = totals["task_exit_steps"].double().reshape(-1)

    def entry(count, solved_t, nll_t, exit_ok, steps) -> dict:
        count = float(count)
        return {
            "problems": int(count),
            "per_step": [{"step": t + 1, "accuracy": float(solved_t[t]) / count, "nll": float(nll_t[t]) / count}
                         for t in range(num_steps)],
            "q_exit": {"q": exit_threshold, "accuracy": float(exit_ok) / count, "avg_steps": float(steps) / count},
        }

    groups = [{"group": name, **entry(problems[g], solved[g], nll[g], exit_solved[g], exit_steps[g])}
              for g, name in enumerate(task.groups) if problems[g] > 0]
    return {
        "task_data": task.path, "group_key": task.group_key,
        "all": entry(problems.sum(), solved.sum(0), nll.sum(0), exit_solved.sum(), exit_steps.sum()),
        "groups": groups,
    }
