"""Corpus files: reading them, and generating the default quickstart corpus without downloads.

The default corpus has two parts:
- natural text harvested from the local Python standard library (docstrings, comment blocks,
  the pydoc help topics and .txt/.rst files), which every Python install ships;
- a seeded synthetic set of multi-step reasoning problems with worked steps and an answer.
"""

import ast
import io
import json
import os
import random
import sysconfig
import tokenize
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

INPUT_FORMATS = ("jsonl", "text", "lines")

# Skipped: tests (boilerplate docstrings), encodings (generated codec tables in comments), and
# site-packages, which differs between otherwise identical Python installs.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings",
              "__pycache__"}
_MIN_COMMENT_WORDS = 6


def read_documents(
    path: str, json_keys: Sequence[str] = ("text",), input_format: Optional[str] = None
) -> Iterator[Dict[str, str]]:
    """Yield one ``{key: text}`` per document.

    ``jsonl``: one JSON object per line, the given keys taken from each; ``text``: documents
    separated by blank lines; ``lines``: one document per line. The two plain formats use the
    key ``text``. By default ``.jsonl``/``.json`` files are jsonl and anything else is lines.
    """
    if input_format is None:
        input_format = "jsonl" if path.endswith((".jsonl", ".json")) else "lines"
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"--input-format {input_format!r} is not one of {INPUT_FORMATS}")
    with open(path, encoding="utf-8") as f:
        if input_format == "lines":
            for line in f:
                if line.strip():
                    yield {"text": line.rstrip("\n")}
        elif input_format == "text":
            paragraph: List[str] = []
            for line in f:
                if line.strip():
                    paragraph.append(line.rstrip("\n"))
                elif paragraph:
                    yield {"text": "\n".join(paragraph)}
                    paragraph = []
            if paragraph:
                yield {"text": "\n".join(paragraph)}
        else:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"--input {path}:{line_no} is not JSON ({err.msg}); plain text needs "
                        f"--input-format text or lines"
                    ) from None
                missing = [key for key in json_keys if key not in record]
                if missing:
                    raise ValueError(f"--json-keys: {path}:{line_no} has no key {missing[0]!r}")
                yield {key: record[key] for key in json_keys}


# ---------------------------------------------------------------------------------------------
# Natural text from the standard library


def _python_file_text(path: str) -> str:
    """Docstrings and multi-word comment blocks of one module, in source order."""
    with open(path, "rb") as f:
        source = f.read()
    pieces: List[Tuple[int, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                pieces.append((getattr(node, "lineno", 0), doc))
    if os.path.basename(path) == "topics.py" and "pydoc_data" in path:
        # The interactive help() topics: the language reference as one dict of prose strings.
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if len(node.value) > 200:
                    pieces.append((node.lineno, node.value.strip()))
    pieces += _comment_blocks(source)
    return "\n\n".join(text for _, text in sorted(pieces, key=lambda p: p[0]))


def _comment_blocks(source: bytes) -> List[Tuple[int, str]]:
    """Runs of comments on consecutive lines, joined, if long enough to be prose."""
    blocks: List[Tuple[int, List[str]]] = []
    last_line = -1
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.string.lstrip("#").strip()
        if blocks and tok.start[0] == last_line + 1:
            blocks[-1][1].append(line)
        else:
            blocks.append((tok.start[0], [line]))
        last_line = tok.start[0]
    joined = [(start, " ".join(lines)) for start, lines in blocks]
    return [(start, text) for start, text in joined if len(text.split()) >= _MIN_COMMENT_WORDS]


def harvest_stdlib_text(max_bytes: int, stdlib_dir: Optional[str] = None) -> List[str]:
    """Documents (one per source file) from the stdlib, in sorted path order, until their UTF-8
    size would exceed ``max_bytes``."""
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    docs: List[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                if name.endswith(".py"):
                    text = _python_file_text(path)
                elif name.endswith((".txt", ".rst")):
                    with open(path, encoding="utf-8") as f:
                        text = f.read().strip()
                else:
                    continue
            except (SyntaxError, ValueError, UnicodeDecodeError, tokenize.TokenError):
                continue  # a few stdlib files are deliberately malformed or not UTF-8
            if not text:
                continue
            size = len(text.encode("utf-8"))
            if total + size > max_bytes:
                return docs
            docs.append(text)
            total += size
    return docs


# ---------------------------------------------------------------------------------------------
# Synthetic multi-step reasoning

_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon",
          "Kira", "Liam", "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara"]
_ITEMS = ["apple", "pencil", "book", "marble", "sticker", "card", "shell", "coin", "stamp", "egg"]
_VEHICLES = ["train", "truck", "bus", "cyclist", "boat", "car"]

Problem = Tuple[str, List[str], str]  # question, worked steps, answer


def _chain(rng: random.Random) -> Problem:
    value = rng.randint(2, 20)
    start = value
    ops, steps = [], []
    for _ in range(rng.randint(3, 6)):
        kind = rng.choice("+-*/")
        if kind == "*" and value < 200:
            k = rng.randint(2, 5)
            ops.append(f"multiply by {k}")
            steps.append(f"{value} * {k} = {value * k}")
            value *= k
        elif kind == "/" and any(value % k == 0 for k in (2, 3, 4, 5)):
            k = rng.choice([k for k in (2, 3, 4, 5) if value % k == 0])
            ops.append(f"divide by {k}")
            steps.append(f"{value} / {k} = {value // k}")
            value //= k
        elif kind == "-" and value > 1:
            k = rng.randint(1, value - 1)
            ops.append(f"subtract {k}")
            steps.append(f"{value} - {k} = {value - k}")
            value -= k
        else:
            k = rng.randint(1, 30)
            ops.append(f"add {k}")
            steps.append(f"{value} + {k} = {value + k}")
            value += k
    question = f"Start with {start}, {', '.join(ops[:-1])}, then {ops[-1]}. What is the result?"
    return question, steps, str(value)


def _shopping(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    item_a, item_b = rng.sample(_ITEMS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    pa, pb = rng.randint(1, 12), rng.randint(1, 12)
    total = a * pa + b * pb
    bill = next(x for x in (10, 20, 50, 100, 200) if x > total)
    question = (f"{name} buys {a} {item_a}s at ${pa} each and {b} {item_b}s at ${pb} each, "
                f"and pays with a ${bill} bill. How much change does {name} get?")
    steps = [f"The {item_a}s cost {a} * {pa} = {a * pa} dollars.",
             f"The {item_b}s cost {b} * {pb} = {b * pb} dollars.",
             f"Together they cost {a * pa} + {b * pb} = {total} dollars.",
             f"The change is {bill} - {total} = {bill - total} dollars."]
    return question, steps, f"${bill - total}"


def _inventory(rng: random.Random) -> Problem:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    have, packs, per_pack = rng.randint(10, 60), rng.randint(2, 6), rng.randint(3, 12)
    give = rng.randint(1, have - 1)
    after_buy = have - give + packs * per_pack
    boxes = rng.choice([k for k in range(2, 10) if after_buy % k == 0] or [1])
    question = (f"{name} has {have} {item}s and gives {give} to {friend}. Then {name} buys "
                f"{packs} packs of {per_pack} {item}s and shares all of them equally among "
                f"{boxes} boxes. How many {item}s go in each box?")
    steps = [f"After giving some away: {have} - {give} = {have - give}.",
             f"The packs hold {packs} * {per_pack} = {packs * per_pack}.",
             f"In total: {have - give} + {packs * per_pack} = {after_buy}.",
             f"Per box: {after_buy} / {boxes} = {after_buy // boxes}."]
    return question, steps, str(after_buy // boxes)


def _travel(rng: random.Random) -> Problem:
    vehicle = rng.choice(_VEHICLES)
    v1, v2 = rng.randint(2, 12) * 5, rng.randint(2, 12) * 5
    t1, t2 = rng.randint(2, 6), rng.randint(2, 6)
    d1, d2 = v1 * t1, v2 * t2
    question = (f"A {vehicle} travels at {v1} km/h for {t1} hours and then at {v2} km/h for "
                f"{t2} hours. How many kilometres does it travel in total?")
    steps = [f"First part: {v1} * {t1} = {d1} km.", f"Second part: {v2} * {t2} = {d2} km.",
             f"Total: {d1} + {d2} = {d1 + d2} km."]
    return question, steps, f"{d1 + d2} km"


def _ages(rng: random.Random) -> Problem:
    a, b, c = rng.sample(_NAMES, 3)
    age_c, diff = rng.randint(2, 15), rng.randint(1, 10)
    factor, years = rng.randint(2, 4), rng.randint(1, 20)
    age_b = age_c + diff
    age_a = age_b * factor
    question = (f"{c} is {age_c} years old. {b} is {diff} years older than {c}, and {a} is "
                f"{factor} times as old as {b}. How old will {a} be in {years} years?")
    steps = [f"{b} is {age_c} + {diff} = {age_b}.", f"{a} is {age_b} * {factor} = {age_a}.",
             f"In {years} years {a} will be {age_a} + {years} = {age_a + years}."]
    return question, steps, str(age_a + years)


def _production(rng: random.Random) -> Problem:
    rate, hours = rng.randint(5, 40), rng.randint(2, 10)
    days, box = rng.randint(2, 7), rng.randint(4, 24)
    per_day = rate * hours
    total = per_day * days
    question = (f"A machine makes {rate} parts per hour and runs {hours} hours a day for "
                f"{days} days. The parts are packed in boxes of {box}. How many full boxes "
                f"are there, and how many parts are left over?")
    steps = [f"Per day: {rate} * {hours} = {per_day} parts.",
             f"In {days} days: {per_day} * {days} = {total} parts.",
             f"Full boxes: {total} // {box} = {total // box}, left over: "
             f"{total} - {total // box} * {box} = {total % box}."]
    return question, steps, f"{total // box} boxes, {total % box} left over"


def _sequence(rng: random.Random) -> Problem:
    first, step, n = rng.randint(1, 20), rng.randint(2, 9), rng.randint(4, 8)
    terms = [first + i * step for i in range(n)]
    question = (f"A sequence starts at {first} and each term is {step} more than the one "
                f"before. What is the sum of the first {n} terms?")
    steps = [f"The terms are {', '.join(map(str, terms))}."]
    running = terms[0]
    for term in terms[1:]:
        steps.append(f"{running} + {term} = {running + term}")
        running += term
    return question, steps, str(running)


def _remainder(rng: random.Random) -> Problem:
    a, b, c, m = rng.randint(3, 30), rng.randint(3, 30), rng.randint(1, 50), rng.randint(3, 13)
    question = f"What is the remainder when {a} * {b} + {c} is divided by {m}?"
    value = a * b + c
    steps = [f"{a} * {b} = {a * b}.", f"{a * b} + {c} = {value}.",
             f"{value} = {m} * {value // m} + {value % m}."]
    return question, steps, str(value % m)


def _ordering(rng: random.Random) -> Problem:
    people = rng.sample(_NAMES, rng.randint(3, 5))  # tallest first
    facts = []
    for taller, shorter in zip(people, people[1:]):
        facts.append(f"{taller} is taller than {shorter}." if rng.random() < 0.5
                     else f"{shorter} is shorter than {taller}.")
    rng.shuffle(facts)
    ask_tallest = rng.random() < 0.5
    question = " ".join(facts) + f" Who is the {'tallest' if ask_tallest else 'shortest'}?"
    steps = [f"{t} is above {s}." for t, s in zip(people, people[1:])]
    steps.append(f"From tallest to shortest: {', '.join(people)}.")
    return question, steps, people[0] if ask_tallest else people[-1]


def _time_units(rng: random.Random) -> Problem:
    hours, minutes, seconds = rng.randint(2, 9), rng.randint(2, 59), rng.randint(2, 59)
    total_min = hours * 60 + minutes
    total = total_min * 60 + seconds
    question = f"How many seconds are in {hours} hours, {minutes} minutes and {seconds} seconds?"
    steps = [f"{hours} hours = {hours} * 60 = {hours * 60} minutes.",
             f"{hours * 60} + {minutes} = {total_min} minutes.",
             f"{total_min} minutes = {total_min} * 60 = {total_min * 60} seconds.",
             f"{total_min * 60} + {seconds} = {total} seconds."]
    return question, steps, str(total)


REASONING_TEMPLATES: List[Callable[[random.Random], Problem]] = [
    _chain, _shopping, _inventory, _travel, _ages, _production, _sequence, _remainder,
    _ordering, _time_units,
]


def generate_reasoning(num: int, seed: int = 1234) -> List[str]:
    """``num`` worked problems: "Question: ...", one "Step k: ..." per step, "Answer: ..."."""
    rng = random.Random(seed)
    texts = []
    for _ in range(num):
        question, steps, answer = rng.choice(REASONING_TEMPLATES)(rng)
        lines = [f"Question: {question}"]
        lines += [f"Step {i}: {step}" for i, step in enumerate(steps, 1)]
        lines.append(f"Answer: {answer}")
        texts.append("\n".join(lines))
    return texts


def _write_jsonl(path: str, texts: List[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def write_default_corpus(
    out_dir: str, max_text_bytes: int = 3_000_000, num_reasoning: int = 10_000, seed: int = 1234
) -> Dict[str, object]:
    """Write ``text.jsonl`` (stdlib prose) and ``reasoning.jsonl`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    text_docs = harvest_stdlib_text(max_text_bytes)
    if not text_docs:
        raise RuntimeError(f"found no text in {sysconfig.get_paths()['stdlib']}")
    reasoning = generate_reasoning(num_reasoning, seed)
    text_path = os.path.join(out_dir, "text.jsonl")
    reasoning_path = os.path.join(out_dir, "reasoning.jsonl")
    _write_jsonl(text_path, text_docs)
    _write_jsonl(reasoning_path, reasoning)
    return {
        "text_path": text_path,
        "reasoning_path": reasoning_path,
        "num_text_docs": len(text_docs),
        "num_reasoning": len(reasoning),
        "text_bytes": sum(len(t.encode("utf-8")) for t in text_docs),
    }
