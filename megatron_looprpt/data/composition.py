"""A knowledge-manipulation task where depth matters: composing memorised relations.

A fixed random world of ``num_entities`` entities and ``num_relations`` relations, each relation
a random permutation of the entities, is the knowledge. A document is a walk through it: a start
entity, then in turn a few relations and the entity they lead to, which the next relations
start from:

    "liro tel rin kesu mop doba zug tel mop roli ..."      (kesu: k = 2 hops from liro, ...)

Only the written entities are trained on (the document's segments alternate context and
answer, ``preprocess_jsonl(segments=True)``), and each needs k lookups that depend on one
another: a network with a fixed number of layers can only chain so many per token, which is
what looping adds (Ouro's controlled experiments find looped models better at manipulating
knowledge they store, not at storing more). k = 1 answers state the facts; for k >= 2 a fixed
share of the (entity, relations) tuples never occurs in training, and the held-out documents
are made of those alone, so a model can only answer them by composing facts, not by recalling
the chain.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import zlib
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

# Pseudo-words: frequent enough in a corpus with the task to become single tokenizer pieces, and
# without the meanings a real word would bring from the text of a blend.
_ENTITY_SYLLABLES = ("ba", "ke", "do", "mi", "su", "ro", "va", "li", "ne", "tu", "fo", "ga")
_RELATION_WORDS = ("tel", "rin", "mop", "zug", "pex", "wal", "fiv", "dob")


@dataclass(frozen=True)
class CompositionTask:
    num_entities: int = 16
    num_relations: int = 4
    max_hops: int = 4
    heldout_share: float = 0.2   # of the (entity, relations) tuples with k >= 2
    # words per document; a training walk has exactly this many. With render="ids" and
    # walk_words = seq_length - 1 every document (with its eod) is one training sequence, so no
    # sequence starts in the middle of a walk, past the entity its first relations start from.
    walk_words: int = 60
    world_seed: int = 7          # the relations: the same world for training and evaluation
    # "words": pseudo-words for a text tokenizer; "ids": NullTokenizer ids (entities 0..E-1,
    # relations E..E+R-1, eod E+R), so the task trains alone with a vocabulary of E+R+1
    render: str = "words"

    def __post_init__(self):
        if not 2 <= self.num_entities <= len(_ENTITY_SYLLABLES) * (len(_ENTITY_SYLLABLES) - 1):
            raise ValueError(f"num_entities must be in [2, {len(_ENTITY_SYLLABLES) * (len(_ENTITY_SYLLABLES) - 1)}]")
        if not 1 <= self.num_relations <= len(_RELATION_WORDS):
            raise ValueError(f"num_relations must be in [1, {len(_RELATION_WORDS)}]")
        if self.max_hops < 1:
            raise ValueError("max_hops must be >= 1")
        if not 0.0 <= self.heldout_share < 1.0:
            raise ValueError("heldout_share must be in [0, 1)")
        if self.walk_words < self.max_hops + 2:
            raise ValueError("walk_words must leave room for a start and one segment of max_hops relations")
        if self.render not in ("words", "ids"):
            raise ValueError(f"render must be words or ids, got {self.render!r}")

    @property
    def entities(self) -> List[str]:
        if self.render == "ids":
            return [str(i) for i in range(self.num_entities)]
        names = [a + b for a in _ENTITY_SYLLABLES for b in _ENTITY_SYLLABLES if a != b]
        return random.Random(self.world_seed).sample(names, self.num_entities)

    @property
    def relations(self) -> List[str]:
        if self.render == "ids":
            return [str(self.num_entities + r) for r in range(self.num_relations)]
        return list(_RELATION_WORDS[: self.num_relations])

    @property
    def vocab_size(self) -> int:
        """The NullTokenizer vocabulary of ``render="ids"`` (its last id is the eod)."""
        return self.num_entities + self.num_relations + 1

    def tables(self) -> List[List[int]]:
        """Relation r maps entity i to tables()[r][i]."""
        rng = random.Random(self.world_seed + 1)
        return [rng.sample(range(self.num_entities), self.num_entities) for _ in range(self.num_relations)]

    def is_heldout(self, entity: int, hops: Tuple[int, ...]) -> bool:
        """Deterministic in the tuple, so training and evaluation agree without a list."""
        if len(hops) < 2:
            return False
        digest = zlib.crc32(bytes([entity % 256, entity // 256, *hops, self.world_seed % 256]))
        return digest % 10_000 < self.heldout_share * 10_000


def answer(tables: List[List[int]], entity: int, hops: Tuple[int, ...]) -> int:
    for relation in hops:
        entity = tables[relation][entity]
    return entity


@functools.lru_cache(maxsize=None)
def heldout_chains(task: CompositionTask, entity: int, hops: int) -> Tuple[Tuple[int, ...], ...]:
    """The held-out relation chains of ``hops`` relations from ``entity``."""
    return tuple(chain for chain in itertools.product(range(task.num_relations), repeat=hops)
                 if task.is_heldout(entity, chain))


def walk(task: CompositionTask, rng: random.Random, heldout: bool, hops: Optional[int] = None) -> Dict:
    """One document: ``segments`` (context, answer, context, answer, ...), the k of every answer
    and the whole ``text``. Training walks (``heldout`` False) never contain a held-out tuple;
    held-out walks contain nothing else (and only k = ``hops`` segments when given; such a walk
    ends early at an entity without held-out chains of that length)."""
    tables, entities, relations = task.tables(), task.entities, task.relations
    state = rng.randrange(task.num_entities)
    segments, ks, words = [entities[state]], [], 1
    while True:
        left = task.walk_words - words
        if hops is not None:
            k = hops
        elif left <= task.max_hops + 1:
            k = left - 1   # the last segment fills the walk exactly
        else:
            # never leave a single word, which no segment (relations and their entity) fills
            k = rng.choice([k for k in range(1, task.max_hops + 1) if left - (k + 1) != 1])
        if k < 1 or words + k + 1 > task.walk_words:
            break
        if heldout and k >= 2:
            choices = heldout_chains(task, state, k)
            if not choices:
                break
            chain = rng.choice(choices)
        else:
            chain = tuple(rng.randrange(task.num_relations) for _ in range(k))
            if task.is_heldout(state, chain):
                continue
        state_after = answer(tables, state, chain)
        segments[-1] += "".join(" " + relations[r] for r in chain)
        segments += [" " + entities[state_after], ""]
        ks.append(k)
        words += k + 1
        state = state_after
    segments.pop()   # the empty context after the last answer
    return {"segments": segments, "k": ks, "text": "".join(segments)}


def _write_jsonl(path: str, records) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    return count


def write_composition_task(out_dir: str, task: CompositionTask, num_train: int, heldout_per_k: int,
                           seed: int = 1234) -> Dict[str, object]:
    """``composition_train.jsonl``: ``num_train`` training walks (k uniform in 1..max_hops);
    ``composition_heldout.jsonl``: ``heldout_per_k`` walks for every k, each of k-hop segments
    only (for k >= 2 held-out tuples only); ``composition_task.json``: the task's settings."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"composition_{name}.jsonl") for name in ("train", "heldout")}
    rng = random.Random(seed)
    _write_jsonl(paths["train"], (walk(task, rng, heldout=False) for _ in range(num_train)))
    heldout_rng = random.Random(seed + 1)
    _write_jsonl(paths["heldout"], (walk(task, heldout_rng, heldout=True, hops=k)
                                    for k in range(1, task.max_hops + 1) for _ in range(heldout_per_k)))
    with open(os.path.join(out_dir, "composition_task.json"), "w") as f:
        json.dump(asdict(task), f, indent=2)
    return {"train_path": paths["train"], "heldout_path": paths["heldout"], "num_train": num_train}
