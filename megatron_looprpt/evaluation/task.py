"""Answer accuracy on a task of trained segments, per loop step and per group (e.g. hops k).

Task data is JSONL of documents in the training format of ``preprocess_jsonl(segments=True)``:
``{"segments": [context, answer, context, answer, ...], <group key>: [group of each answer]}``
(a single group value applies to every answer; without the key every answer is in group "all").
Documents are packed into rows of ``seq_length`` tokens the way training packs them (one after
another, eod between, none split across rows), so an answer is scored in the context it was
trained in. An answer counts as right at loop step t when every one of its tokens is step t's
prediction; with Q-exit, when every token is right at its own exit step. The sums travel through
the same pipeline schedules and reductions as the other metrics, so every layout gives the same
numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_looprpt.arguments import ConfigError
from megatron_looprpt.data.datasets import segment_spans
from megatron_looprpt.models.exit_gate import exit_distribution, q_exit_steps


@dataclass
class TaskDocument:
    ids: List[int]
    answers: List[tuple]   # (token positions, group index) of each trained segment


@dataclass
class TaskSet:
    documents: List[TaskDocument]
    groups: List[str]   # the group values, sorted (numerically where they are numbers)
    group_key: str
    path: str


def _sort_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _read_records(path: str, group_key: str) -> List[tuple]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--task-data {path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{where} is not JSON ({error.msg})") from None
            segments = record.get("segments")
            if not isinstance(segments, list) or len(segments) < 2 or not all(isinstance(s, str) for s in segments):
                raise ConfigError(f"{where} needs a \"segments\" list of strings: context, answer, context, "
                                  "answer, ...")
            num_answers = len(segments) // 2
            groups = record.get(group_key, "all")
            groups = [str(g) for g in groups] if isinstance(groups, list) else [str(groups)] * num_answers
            if len(groups) != num_answers:
                raise ConfigError(f"{where}: {len(groups)} {group_key!r} values for {num_answers} answers")
            records.append((segments, groups))
    return records


def read_task(path: str, tokenizer, group_key: str = "k") -> TaskSet:
    """Tokenize every document of ``path`` as training does (``data.datasets.segment_spans``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--task-data {path} does not exist (write one with data/composition.py)")
    records = _read_records(path, group_key)
    if not records:
        raise ConfigError(f"--task-data {path} holds no documents")
    groups = sorted({g for _, record_groups in records for g in record_groups}, key=_sort_key)
    index = {group: i for i, group in enumerate(groups)}
    documents = []
    for segments, record_groups in records:
        ids, spans = segment_spans(tokenizer, segments)
        answers = []
        for (start, end), group in zip(spans[1::2], record_groups):
            if start == end or start == 0:
                raise ConfigError(f"--task-data {path}: an answer in {segments!r} "
                                  + ("tokenizes to nothing" if start == end else "has no context before it"))
            answers.append((list(range(start, end)), index[group]))
        documents.append(TaskDocument(ids, answers))
    return TaskSet(documents, groups, group_key, path)


@dataclass
class PackedRow:
    tokens: List[int]                 # seq_length + 1 ids (input and shifted labels)
    answers: List[tuple]              # (label positions, group) per answer in the row


def pack_rows(task: TaskSet, seq_length: int, eod: int) -> List[PackedRow]:
    rows, tokens, answers = [], [], []
    for document in task.documents:
        ids = document.ids + [eod]
        if len(ids) > seq_length + 1:
            raise ConfigError(f"--task-data {task.path}: a document of {len(ids)} tokens does not fit "
                              f"--seq-length {seq_length}")
        if len(tokens) + len(ids) > seq_length + 1:
            rows.append(PackedRow(tokens + [eod] * (seq_length + 1 - len(tokens)), answers))
            tokens, answers = [], []
        # the label at position i is token i + 1: token j of the answer is the label at j - 1
        answers += [([len(tokens) + j - 1 for j in positions], group) for positions, group in document.answers]
        tokens = tokens + ids
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
        "task_answers": one_hot.sum(dim=0),
        "task_solved": one_hot.t() @ solved,
        "task_nll": one_hot.t() @ problem_nll,
        "task_exit_solved": one_hot.t() @ exit_solved,
        # mean loop steps over a problem's answer tokens, summed over problems
        "task_exit_steps": one_hot.t() @ (exit_steps / tokens.clamp_min(1.0)),
    }


def summarize_task(totals: Dict[str, torch.Tensor], task: TaskSet, num_steps: int, exit_threshold: float) -> dict:
    """Accuracies per group and step (and over every problem) from reduced sums."""
    problems = totals["task_answers"].double().reshape(-1)
    solved = totals["task_solved"].double().reshape(len(task.groups), num_steps)
    nll = totals["task_nll"].double().reshape(len(task.groups), num_steps)
    exit_solved = totals["task_exit_solved"].double().reshape(-1)
    exit_steps = totals["task_exit_steps"].double().reshape(-1)

    def entry(count, solved_t, nll_t, exit_ok, steps) -> dict:
        count = float(count)
        return {
            "answers": int(count),
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
