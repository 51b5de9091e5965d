"""The composition task (data/composition.py) and its per-step, per-k answer accuracy
(evaluation/task.py) on hand-made cases."""

import itertools
import json

import pytest
import torch

from megatron_looprpt.arguments import ConfigError
from megatron_looprpt.data.composition import (CompositionTask, answer, heldout_problems, training_problems,
                                               write_composition_task)
from megatron_looprpt.data.tokenizers import NullTokenizer
from megatron_looprpt.evaluation import task as task_metrics


def _tuple(task, problem):
    words = problem["prompt"].split()[:-1]
    entity = task.entities.index(words[0])
    return entity, tuple(task.relations.index(w) for w in words[1:])


def test_problems_are_correct_and_held_out_tuples_never_trained():
    task = CompositionTask(num_entities=6, num_relations=3, max_hops=3, heldout_share=0.3)
    tables = task.tables()
    for r in range(task.num_relations):                    # relations are permutations
        assert sorted(tables[r]) == list(range(task.num_entities))
    train = list(training_problems(task, 3000, seed=1))
    assert {p["k"] for p in train} == {1, 2, 3}
    for problem in train:
        entity, hops = _tuple(task, problem)
        assert len(hops) == problem["k"] and not task.is_heldout(entity, hops)
        assert problem["completion"] == " " + task.entities[answer(tables, entity, hops)]
    heldout = heldout_problems(task, per_k=1000, seed=2)
    tuples = [_tuple(task, p) for p in heldout]
    assert len(set(tuples)) == len(tuples)                 # distinct
    facts = [t for t in tuples if len(t[1]) == 1]
    assert len(facts) == task.num_entities * task.num_relations   # k = 1: every fact, recalled
    for k in (2, 3):
        space = [(e, hops) for e in range(task.num_entities)
                 for hops in itertools.product(range(task.num_relations), repeat=k)]
        held = {t for t in space if task.is_heldout(*t)}
        assert 0.15 < len(held) / len(space) < 0.45        # about heldout_share of them
        assert {t for t in tuples if len(t[1]) == k} == held   # all of them (fewer than per_k)
    assert not {_tuple(task, p) for p in train} & set(t for t in tuples if len(t[1]) >= 2)
    assert heldout == heldout_problems(task, per_k=1000, seed=2)   # deterministic


def test_written_files(tmp_path):
    info = write_composition_task(str(tmp_path), CompositionTask(max_hops=2), num_train=50, heldout_per_k=10)
    with open(info["train_path"]) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 50 and set(records[0]) == {"prompt", "completion", "k", "text"}
    assert info["num_heldout"] == 20


def _numbers_task(tmp_path, problems):
    """A task file whose text is NullTokenizer ids: prompt ids, answer ids, group."""
    path = tmp_path / "task.jsonl"
    with open(path, "w") as f:
        for prompt, completion, k in problems:
            f.write(json.dumps({"prompt": prompt, "completion": completion, "k": k}) + "\n")
    return task_metrics.read_task(str(path), NullTokenizer(32))


def test_packing_places_answers_as_training_does(tmp_path):
    task = _numbers_task(tmp_path, [("1 2 3", "9", 1), ("4 5", "10 11", 2), ("6 7 8 1 2", "12", 1)])
    assert task.groups == ["1", "2"]
    rows = task_metrics.pack_rows(task, seq_length=10, eod=31)
    # prompt + answer + eod, whole problems per row: 5 + 5 tokens fill the first row's 11
    assert rows[0].tokens == [1, 2, 3, 9, 31, 4, 5, 10, 11, 31, 31]
    assert rows[1].tokens[:7] == [6, 7, 8, 1, 2, 12, 31]
    labels = rows[0].tokens[1:]
    assert [[labels[i] for i in positions] for positions, _ in rows[0].answers] == [[9], [10, 11]]
    with pytest.raises(ConfigError, match="does not fit --seq-length 4"):
        task_metrics.pack_rows(task, seq_length=4, eod=31)


def test_task_sums_per_step_and_group(tmp_path):
    task = _numbers_task(tmp_path, [("1 2", "9", 1), ("3", "10 11", 2), ("4", "12", 2)])
    rows = task_metrics.pack_rows(task, seq_length=12, eod=31)
    batch = task_metrics._micro_batch([rows[0], None], seq_length=12)
    labels = batch["labels"]
    steps = 3
    predictions = torch.zeros(steps, *labels.shape, dtype=torch.long)
    (p1,), (p2a, p2b), (p3,) = [positions for positions, _ in rows[0].answers]
    # step 1 solves problem 1; step 2 also gets one of problem 2's two tokens; step 3 solves all
    predictions[0, 0, p1] = labels[0, p1]
    predictions[1, 0, [p1, p2a]] = labels[0, [p1, p2a]]
    predictions[2, 0, [p1, p2a, p2b, p3]] = labels[0, [p1, p2a, p2b, p3]]
    logprobs = torch.full((steps, *labels.shape), -2.0)
    # a gate that exits every token after step 2 (q = 0.5): 0-based step 1
    gate = torch.tensor([-8.0, 8.0, 0.0]).view(steps, 1, 1).expand(steps, *labels.shape)
    sums = task_metrics.task_sums(batch, predictions, logprobs, gate, num_groups=2, exit_threshold=0.5)
    assert sums["task_problems"].tolist() == [1.0, 2.0]
    assert sums["task_solved"].tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]]
    # NLL summed over a problem's answer tokens: 2 for one token, 4 for two
    assert sums["task_nll"].tolist() == [[2.0] * 3, [6.0] * 3]
    assert sums["task_exit_solved"].tolist() == [1.0, 0.0]
    assert sums["task_exit_steps"].tolist() == [2.0, 4.0]
    summary = task_metrics.summarize_task(sums, task, steps, 0.5)
    k2 = summary["groups"][1]
    assert k2["group"] == "2" and [s["accuracy"] for s in k2["per_step"]] == [0.0, 0.0, 1.0]
    assert summary["all"]["per_step"][2]["accuracy"] == 1.0 and summary["all"]["problems"] == 3


def test_bad_task_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        task_metrics.read_task(str(tmp_path / "missing.jsonl"), NullTokenizer(8))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1"}\n')
    with pytest.raises(ConfigError, match="no 'completion' field"):
        task_metrics.read_task(str(tmp_path / "bad.jsonl"), NullTokenizer(8))
