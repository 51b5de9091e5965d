"""The composition task (data/composition.py) and its per-step, per-k answer accuracy
(evaluation/task.py) on hand-made cases."""

import itertools
import json
import random

import pytest
import torch

from megatron_looprpt.arguments import ConfigError
from megatron_looprpt.data.composition import CompositionTask, answer, walk, write_composition_task
from megatron_looprpt.data.tokenizers import NullTokenizer
from megatron_looprpt.evaluation import task as task_metrics


def _segments_tuples(task, document):
    """(entity, relations, answer) of every answer of a walk document."""
    words = document["text"].split()
    entities, relations = task.entities, task.relations
    out, state, chain = [], entities.index(words[0]), []
    for word in words[1:]:
        if word in relations:
            chain.append(relations.index(word))
        else:
            out.append((state, tuple(chain), entities.index(word)))
            state, chain = entities.index(word), []
    return out


def test_walks_are_correct_and_held_out_tuples_never_trained():
    task = CompositionTask(num_entities=6, num_relations=3, max_hops=3, heldout_share=0.3, walk_words=40)
    tables = task.tables()
    for r in range(task.num_relations):                    # relations are permutations
        assert sorted(tables[r]) == list(range(task.num_entities))
    rng = random.Random(1)
    trained = set()
    for _ in range(300):
        document = walk(task, rng, heldout=False)
        segments = document["segments"]
        assert "".join(segments) == document["text"] and len(segments) == 2 * len(document["k"])
        assert len(document["text"].split()) <= task.walk_words
        answers = _segments_tuples(task, document)
        assert [len(chain) for _, chain, _ in answers] == document["k"]
        # the trained segments are exactly the written entities, each the chain's result
        assert [s.strip() for s in segments[1::2]] == [task.entities[a] for _, _, a in answers]
        for entity, chain, result in answers:
            assert answer(tables, entity, chain) == result and not task.is_heldout(entity, chain)
            trained.add((entity, chain))
    assert {len(chain) for _, chain in trained} == {1, 2, 3}
    space = [(e, chain) for e in range(task.num_entities) for chain in itertools.product(range(3), repeat=2)]
    assert 0.15 < sum(task.is_heldout(*t) for t in space) / len(space) < 0.45   # about heldout_share
    for k in (1, 2, 3):
        document = walk(task, rng, heldout=True, hops=k)
        answers = _segments_tuples(task, document)
        assert answers and document["k"] == [k] * len(answers)
        for entity, chain, result in answers:
            assert answer(tables, entity, chain) == result
            assert k == 1 or task.is_heldout(entity, chain)   # k = 1: the facts themselves


def test_written_files(tmp_path):
    info = write_composition_task(str(tmp_path), CompositionTask(max_hops=2), num_train=50, heldout_per_k=10)
    with open(info["train_path"]) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 50 and set(records[0]) == {"segments", "k", "text"}
    with open(info["heldout_path"]) as f:
        assert [json.loads(line)["k"][0] for line in f] == [1] * 10 + [2] * 10
    assert json.loads((tmp_path / "composition_task.json").read_text())["max_hops"] == 2


def _numbers_task(tmp_path, problems):
    """A task file whose text is NullTokenizer ids: one document (context, answer) per problem."""
    path = tmp_path / "task.jsonl"
    with open(path, "w") as f:
        for prompt, completion, k in problems:
            f.write(json.dumps({"segments": [prompt, " " + completion], "k": [k]}) + "\n")
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
    # a document with several answers, each with its group
    (tmp_path / "walk.jsonl").write_text(json.dumps({"segments": ["1 2", " 9", " 3", " 10"], "k": [1, 2]}) + "\n")
    walk_task = task_metrics.read_task(str(tmp_path / "walk.jsonl"), NullTokenizer(32))
    row = task_metrics.pack_rows(walk_task, seq_length=10, eod=31)[0]
    assert row.tokens[:6] == [1, 2, 9, 3, 10, 31]
    assert [(positions, walk_task.groups[g]) for positions, g in row.answers] == [([1], "1"), ([3], "2")]
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
    assert sums["task_answers"].tolist() == [1.0, 2.0]
    assert sums["task_solved"].tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]]
    # NLL summed over a problem's answer tokens: 2 for one token, 4 for two
    assert sums["task_nll"].tolist() == [[2.0] * 3, [6.0] * 3]
    assert sums["task_exit_solved"].tolist() == [1.0, 0.0]
    assert sums["task_exit_steps"].tolist() == [2.0, 4.0]
    summary = task_metrics.summarize_task(sums, task, steps, 0.5)
    k2 = summary["groups"][1]
    assert k2["group"] == "2" and [s["accuracy"] for s in k2["per_step"]] == [0.0, 0.0, 1.0]
    assert summary["all"]["per_step"][2]["accuracy"] == 1.0 and summary["all"]["answers"] == 3


def test_bad_task_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        task_metrics.read_task(str(tmp_path / "missing.jsonl"), NullTokenizer(8))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1"}\n')
    with pytest.raises(ConfigError, match="needs a \"segments\" list"):
        task_metrics.read_task(str(tmp_path / "bad.jsonl"), NullTokenizer(8))
    (tmp_path / "bad.jsonl").write_text('{"segments": ["1", " 2"], "k": [1, 2]}\n')
    with pytest.raises(ConfigError, match="2 'k' values for 1 answers"):
        task_metrics.read_task(str(tmp_path / "bad.jsonl"), NullTokenizer(8))
