"""A knowledge-manipulation task where depth matters: composing memorised relations.

A fixed random world of ``num_entities`` entities and ``num_relations`` relations, each relation
a random permutation of the entities, is the knowledge. A problem names an entity and k
relations and asks where applying them in order leads:

    prompt "bova tel rin tel ="   completion " kesu"      (k = 3)

Solving it takes k lookups, each depending on the one before: a network with a fixed number of
layers can only chain so many, which is what looping adds (Ouro's controlled experiments find
looped models better at manipulating knowledge they store, not at storing more of it). k = 1
problems state the facts themselves; for k >= 2 a fixed share of the (entity, relations) tuples
is held out of training, so a model can only answer them by composing what it knows, not by
recalling the whole chain.

``write_composition_task`` writes the training problems as prompt/completion JSONL for
``preprocess_jsonl(prompt_key="prompt")`` (the loss counts the answer only) and the held-out
problems as JSONL with their k for ``tools/evaluate.py --task-data``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

# Pseudo-words: frequent enough in the corpus to become single tokenizer pieces, and without the
# meanings a real word would bring from the text half of a blend.
_ENTITY_SYLLABLES = ("ba", "ke", "do", "mi", "su", "ro", "va", "li", "ne", "tu", "fo", "ga")
_RELATION_WORDS = ("tel", "rin", "mop", "zug", "pex", "wal", "fiv", "dob")


@dataclass(frozen=True)
class CompositionTask:
    num_entities: int = 16
    num_relations: int = 4
    max_hops: int = 4
    heldout_share: float = 0.2   # of the (entity, relations) tuples with k >= 2
    world_seed: int = 7          # the relations: the same world for training and evaluation

    def __post_init__(self):
        if not 2 <= self.num_entities <= len(_ENTITY_SYLLABLES) ** 2:
            raise ValueError(f"num_entities must be in [2, {len(_ENTITY_SYLLABLES) ** 2}]")
        if not 1 <= self.num_relations <= len(_RELATION_WORDS):
            raise ValueError(f"num_relations must be in [1, {len(_RELATION_WORDS)}]")
        if self.max_hops < 1:
            raise ValueError("max_hops must be >= 1")
        if not 0.0 <= self.heldout_share < 1.0:
            raise ValueError("heldout_share must be in [0, 1)")

    @property
    def entities(self) -> List[str]:
        names = [a + b for a in _ENTITY_SYLLABLES for b in _ENTITY_SYLLABLES if a != b]
        return random.Random(self.world_seed).sample(names, self.num_entities)

    @property
    def relations(self) -> List[str]:
        return list(_RELATION_WORDS[: self.num_relations])

    def tables(self) -> List[List[int]]:
        """Relation r maps entity i to tables()[r][i]."""
        rng = random.Random(self.world_seed + 1)
        return [rng.sample(range(self.num_entities), self.num_entities) for _ in range(self.num_relations)]

    def is_heldout(self, entity: int, hops: Tuple[int, ...]) -> bool:
        """Deterministic in the tuple, so training and evaluation agree without a list."""
        if len(hops) < 2:
            return False
        digest = zlib.crc32(bytes([entity, *hops, self.world_seed % 256]))
        return digest % 10_000 < self.heldout_share * 10_000


def answer(tables: List[List[int]], entity: int, hops: Tuple[int, ...]) -> int:
    for relation in hops:
        entity = tables[relation][entity]
    return entity


def _problem(task: CompositionTask, tables, entity: int, hops: Tuple[int, ...]) -> Dict:
    entities, relations = task.entities, task.relations
    prompt = " ".join([entities[entity], *(relations[r] for r in hops), "="])
    completion = " " + entities[answer(tables, entity, hops)]
    # "text": the whole problem, for training a tokenizer on the task's words
    return {"prompt": prompt, "completion": completion, "k": len(hops), "text": prompt + completion}


def training_problems(task: CompositionTask, count: int, seed: int) -> Iterator[Dict]:
    """``count`` problems, k uniform in [1, max_hops], none of them held out."""
    rng = random.Random(seed)
    tables = task.tables()
    made = 0
    while made < count:
        entity = rng.randrange(task.num_entities)
        hops = tuple(rng.randrange(task.num_relations) for _ in range(rng.randint(1, task.max_hops)))
        if task.is_heldout(entity, hops):
            continue
        yield _problem(task, tables, entity, hops)
        made += 1


def heldout_problems(task: CompositionTask, per_k: int, seed: int) -> List[Dict]:
    """Up to ``per_k`` distinct problems for every k: for k = 1 the facts (recall), for k >= 2
    held-out tuples (composition); fewer where fewer exist."""
    rng = random.Random(seed)
    tables = task.tables()
    result = []
    for k in range(1, task.max_hops + 1):
        space = task.num_entities * task.num_relations ** k
        chosen = set()
        if space <= 20 * per_k:   # small: enumerate every tuple
            candidates = [(e, tuple(hops)) for e in range(task.num_entities)
                          for hops in itertools.product(range(task.num_relations), repeat=k)]
            rng.shuffle(candidates)
            chosen = [c for c in candidates if k == 1 or task.is_heldout(*c)][:per_k]
        else:                     # large: draw distinct tuples until enough are held out
            picked = []
            while len(picked) < per_k:
                c = (rng.randrange(task.num_entities), tuple(rng.randrange(task.num_relations) for _ in range(k)))
                if c not in chosen and task.is_heldout(*c):
                    chosen.add(c)
                    picked.append(c)
            chosen = picked
        result += [_problem(task, tables, entity, hops) for entity, hops in chosen]
    return result


def _write_jsonl(path: str, records) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    return count


def write_composition_task(out_dir: str, task: CompositionTask, num_train: int, heldout_per_k: int,
                           seed: int = 1234) -> Dict[str, object]:
    """``composition_train.jsonl`` (prompt/completion) and ``composition_heldout.jsonl`` (with k)
    under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    train_path = os.path.join(out_dir, "composition_train.jsonl")
    heldout_path = os.path.join(out_dir, "composition_heldout.jsonl")
    _write_jsonl(train_path, training_problems(task, num_train, seed))
    num_heldout = _write_jsonl(heldout_path, heldout_problems(task, heldout_per_k, seed + 1))
    return {"train_path": train_path, "heldout_path": heldout_path, "num_train": num_train,
            "num_heldout": num_heldout}
