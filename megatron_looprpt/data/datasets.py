"""Indexed datasets on disk, and train/valid/test GPT datasets and batches built from them.

- ``preprocess_jsonl``: documents -> megatron-core ``.bin/.idx`` files (Megatron-LM layout).
- ``build_datasets``: megatron-core ``BlendedMegatronDatasetBuilder`` over ``GPTDataset``.
- ``build_data_iterator``: micro-batches in a resumable, dp-size-independent order.

Documents of segments (``preprocess_jsonl(segments=True)``: context and trained text in turn, a
prompt and its completion for instance) count only their trained segments in the loss: beside ``{prefix}_{key}_document`` a second indexed dataset with the same document
lengths, ``{prefix}_{key}_loss_mask``, holds 1 for every token whose prediction is trained and 0
for the prompt's. The token dataset stays a plain megatron dataset; the GPT dataset reads the
mask where one lies beside the tokens (``loss_mask_prefix``) and multiplies it into
``loss_mask``. This is how synthetic tasks train on their answers only (``data/composition``).
"""

import importlib
import itertools
import math
import multiprocessing
import os
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from megatron_looprpt.data.corpus import read_documents
from megatron_looprpt.data.tokenizers import Tokenizer, build_tokenizer

DataPath = Union[str, Sequence[str]]

# ---------------------------------------------------------------------------------------------
# Preprocessing

_worker_encoder: Optional["_Encoder"] = None


# One encoded document: its token ids and, for prompt/completion documents, the loss mask.
Encoded = Tuple[List[int], Optional[List[int]]]


def segment_spans(tokenizer: Tokenizer, segments: Sequence[str]) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Ids of a document given as text segments, and each segment's [start, end) in them. The
    ids are those of the joined text, split where each segment's prefix ends; where the
    tokenizer merges across a boundary the segment is tokenized apart. (Tokenizing each segment
    alone would differ by tokenizer: SentencePiece starts every text with a word boundary,
    byte-level BPE does not.)"""
    ids: List[int] = []
    spans = []
    text = ""
    for segment in segments:
        text += segment
        joint = tokenizer.tokenize(text)
        new = joint[len(ids):] if joint[: len(ids)] == ids else tokenizer.tokenize(segment)
        spans.append((len(ids), len(ids) + len(new)))
        ids += new
    return ids, spans


def segment_ids(tokenizer: Tokenizer, segments: Sequence[str]) -> Tuple[List[int], List[int]]:
    """Ids and loss mask of a document of segments alternating context and trained text (the
    first is context; it may be empty): 1 on the trained segments' tokens."""
    ids, spans = segment_spans(tokenizer, segments)
    mask = [0] * len(ids)
    for start, end in spans[1::2]:
        mask[start:end] = [1] * (end - start)
    return ids, mask


class _Encoder:
    """Tokenizes one ``{key: text}`` record into ``{key: (ids, mask)}`` (eod appended if asked).

    With ``segments`` every value is a list of segments alternating context and trained text
    (``segment_ids``), and the eod counts as trained; otherwise the mask is None (every token
    counts)."""

    def __init__(self, tokenizer: Tokenizer, append_eod: bool, segments: bool = False) -> None:
        self.tokenizer = tokenizer
        self.append_eod = append_eod
        self.segments = segments

    def __call__(self, record: Dict[str, Union[str, List[str]]]) -> Tuple[Dict[str, Encoded], int]:
        encoded, num_bytes = {}, 0
        for key, value in record.items():
            if self.segments:
                if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
                    raise ValueError(f"--segments: the --json-keys field {key!r} must be a list of strings "
                                     "(context, trained text, context, ...)")
                ids, mask = segment_ids(self.tokenizer, value)
                num_bytes += sum(len(part.encode("utf-8")) for part in value)
            else:
                ids, mask = self.tokenizer.tokenize(value), None
                num_bytes += len(value.encode("utf-8"))
            if self.append_eod and ids:
                ids = ids + [self.tokenizer.eod]
                mask = None if mask is None else mask + [1]
            encoded[key] = (ids, mask)
        return encoded, num_bytes


def _init_worker(tokenizer_type: str, tokenizer_model: Optional[str], vocab_size: Optional[int],
                 append_eod: bool, segments: bool) -> None:
    # Tokenizers wrap native objects, so each worker builds its own rather than unpickling one.
    global _worker_encoder
    _worker_encoder = _Encoder(build_tokenizer(tokenizer_type, tokenizer_model, vocab_size),
                               append_eod, segments)


def _encode_in_worker(record: Dict[str, str]) -> Tuple[Dict[str, Encoded], int]:
    return _worker_encoder(record)


def document_prefix(output_prefix: str, key: str) -> str:
    """Megatron-LM's naming: ``{output_prefix}_{key}_document`` (+ ``.bin``/``.idx``)."""
    return f"{output_prefix}_{key}_document"


def loss_mask_prefix(prefix: str) -> str:
    """Where the loss mask of the documents at ``prefix`` lies (see the module docstring)."""
    stem = prefix[: -len("_document")] if prefix.endswith("_document") else prefix
    return f"{stem}_loss_mask"


def preprocess_jsonl(
    inputs: Union[str, Sequence[str]],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
    json_keys: Sequence[str] = ("text",),
    input_format: str = "jsonl",
    append_eod: bool = True,
    workers: int = 1,
    chunk_size: int = 64,
    log_interval: int = 10_000,
    segments: bool = False,
) -> Dict[str, str]:
    """Tokenize documents into one indexed dataset per json key; returns ``{key: prefix}``.

    Documents that tokenize to nothing are skipped. ``input_format`` is jsonl, text or lines (see
    ``corpus.read_documents``); the plain-text formats have the single key ``text``.
    ``segments`` (jsonl only): every ``json_keys`` field is a list of text segments alternating
    context and trained text (a prompt and its completion: ``[prompt, completion]``); only the
    trained ones count in the loss, by the masks written beside the tokens (``loss_mask_prefix``).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path} does not exist")
    keys = list(json_keys) if input_format == "jsonl" else ["text"]
    if segments and input_format != "jsonl":
        raise ValueError("--segments needs --input-format jsonl (lists of segments in JSON fields)")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size)
    records = itertools.chain.from_iterable(
        read_documents(path, keys, input_format) for path in inputs
    )
    # Pull the first record before creating outputs so a wrong --json-keys leaves no files.
    first = next(records, None)
    if first is None:
        raise ValueError(f"--input {' '.join(inputs)} contains no documents")
    records = itertools.chain([first], records)

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefixes = {key: document_prefix(output_prefix, key) for key in keys}
    builders = {key: IndexedDatasetBuilder(p + ".bin", dtype=dtype) for key, p in prefixes.items()}
    mask_builders = {}
    if segments:
        mask_builders = {key: IndexedDatasetBuilder(loss_mask_prefix(p) + ".bin", dtype=DType.optimal_dtype(2))
                         for key, p in prefixes.items()}

    pool = None
    if workers > 1:
        pool = multiprocessing.Pool(
            workers, _init_worker, (tokenizer_type, tokenizer_model, vocab_size, append_eod, segments)
        )
        encoded = pool.imap(_encode_in_worker, records, chunk_size)
    else:
        encoded = map(_Encoder(tokenizer, append_eod, segments), records)

    start, total_bytes = time.time(), 0
    try:
        for num_docs, (doc, num_bytes) in enumerate(encoded, 1):
            total_bytes += num_bytes
            for key, (ids, mask) in doc.items():
                if ids:
                    builders[key].add_document(ids, [len(ids)])
                    if mask is not None:
                        mask_builders[key].add_document(mask, [len(mask)])
            if num_docs % log_interval == 0:
                elapsed = max(time.time() - start, 1e-9)
                print(f"processed {num_docs} documents ({num_docs / elapsed:.0f} docs/s, "
                      f"{total_bytes / elapsed / 2**20:.2f} MB/s)", file=sys.stderr)
    finally:
        if pool is not None:
            pool.terminate()
    for key, builder in builders.items():
        builder.finalize(prefixes[key] + ".idx")
    for key, builder in mask_builders.items():
        builder.finalize(loss_mask_prefix(prefixes[key]) + ".idx")
    return prefixes


# ---------------------------------------------------------------------------------------------
# Datasets


def parse_data_path(data_path: DataPath) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron blend list -> (prefixes, weights or None).

    ``"prefix"``, ``["prefixA", "prefixB"]`` or ``["0.7", "prefixA", "0.3", "prefixB"]``.
    """
    from megatron.core.datasets.utils import get_blend_from_list

    items = [data_path] if isinstance(data_path, str) else list(data_path)
    if not items:
        raise ValueError("--data-path is empty")
    return get_blend_from_list(items)


def validate_data_prefixes(data_path: DataPath) -> Tuple[List[str], Optional[List[float]]]:
    """Check every prefix has its ``.bin`` and ``.idx``, building nothing; returns the blend."""
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise FileNotFoundError(
                    f"--data-path: {prefix + suffix} does not exist "
                    f"(make it with tools/preprocess_data.py)"
                )
    return prefixes, weights


def split_sequences(data_path: DataPath, split: str, split_index: int, seq_length: int) -> int:
    """The most sequences split ``split_index`` (0 train, 1 valid, 2 test) of ``--split`` gives
    before megatron's GPTDataset starts over on any of its documents (a second epoch). For a
    weighted blend: the most whose share of every dataset (with the builder's surplus) stays
    within one epoch of that dataset's split. Raises ValueError when the split is empty."""
    import dataclasses

    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import normalize

    # The GPTDatasetConfig settings build_datasets leaves at megatron's defaults: a sequence
    # reads one token past its end (the last label), and each dataset of a weighted blend is
    # built with a surplus of samples.
    defaults = {f.name: f.default for f in dataclasses.fields(GPTDatasetConfig)}
    extra_token, surplus = int(defaults["add_extra_token_to_sequence"]), defaults["mid_level_dataset_surplus"]

    bookends = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[split_index]
    if bookends is None:
        raise ValueError(f"--split {split} gives the {('train', 'valid', 'test')[split_index]} split no documents")

    def epoch_sequences(prefix: str) -> int:
        # Keep the dataset referenced: its __del__ unmaps the memory sequence_lengths views.
        indexed = IndexedDataset(prefix)
        lengths = indexed.sequence_lengths
        beg, end = (int(round(b * len(lengths))) for b in bookends)   # megatron's document split
        return max(0, (int(lengths[beg:end].sum()) - extra_token) // seq_length)

    def fits_one_epoch(num_samples: int, weights: Sequence[float], epochs: Sequence[int]) -> bool:
        # what megatron's builder asks of each dataset of a weighted blend for num_samples in all
        return all(math.ceil(math.ceil(num_samples * w) * (1 + surplus)) <= epoch
                   for w, epoch in zip(weights, epochs))

    prefixes, weights = parse_data_path(data_path)
    epochs = [epoch_sequences(prefix) for prefix in prefixes]
    if weights is None:   # one epoch of each dataset, blended as they come
        return sum(epochs)
    used = [(w, epoch) for w, epoch in zip(normalize(weights), epochs) if w > 0]
    # Start from a bound the rounding can only lower, and step down to the first that fits.
    num_samples = min(math.floor(epoch / (w * (1 + surplus))) for w, epoch in used)
    while num_samples > 0 and not fits_one_epoch(num_samples, *zip(*used)):
        num_samples -= 1
    return num_samples


def held_out_batches(data_path: DataPath, split: str, split_index: int, seq_length: int, eval_iters: int,
                     global_batch_size: int, verb: str) -> Tuple[int, int]:
    """(global batches to read, sequences the split holds): ``eval_iters`` capped at one epoch of
    the split, so that no held-out token is scored twice. Counted from the data files alone, so
    every rank gets the same number; rank 0 says so in one line when it caps (``verb``: what the
    caller does with the batches). Raises ValueError when the split is empty."""
    held = split_sequences(data_path, split, split_index, seq_length)
    batches = min(eval_iters, held // global_batch_size)
    if batches < eval_iters and int(os.environ.get("RANK", "0")) == 0:
        name = ("train", "valid", "test")[split_index]
        print(f"--eval-iters {eval_iters} asks for {eval_iters * global_batch_size} sequences, the {name} "
              f"split of --split {split} holds {held}: {verb} {batches} batches", flush=True)
    return batches, held


def ensure_dataset_helpers() -> None:
    """Make sure megatron-core's compiled index helpers import, building them once if not.

    ``megatron.core.datasets.utils.compile_helpers`` runs ``make`` in the package directory
    and calls ``sys.exit`` on failure, so that exit is caught and reported as an error here.
    """
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return
    except ImportError:
        pass
    from megatron.core.datasets.utils import compile_helpers

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        try:
            compile_helpers()
        except SystemExit:
            pass
    if distributed:
        torch.distributed.barrier()
    importlib.invalidate_caches()
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError as err:
        raise RuntimeError(
            "megatron-core's C++ dataset helpers (megatron.core.datasets.helpers_cpp) are "
            "missing and could not be compiled; install a megatron-core build that ships them, "
            "or a C++ compiler, make and pybind11"
        ) from err


def _check_splits_nonempty(prefixes: List[str], split_matrix, split: str) -> None:
    # GPTDataset loops forever looking for tokens when a used split has no documents
    # (megatron-core 0.16: _get_num_epochs), so refuse that up front.
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    for prefix in prefixes:
        # Keep the dataset referenced: its __del__ unmaps the memory sequence_lengths views.
        indexed = IndexedDataset(prefix)
        lengths = indexed.sequence_lengths
        for part in Split:
            bookends = split_matrix[part.value]
            if bookends is None:
                continue
            beg, end = (int(round(b * len(lengths))) for b in bookends)
            if lengths[beg:end].sum() == 0:
                raise ValueError(
                    f"--split {split} leaves the {part.name} split of {prefix} without tokens "
                    f"({len(lengths)} documents in all); give that split 0 or add data"
                )


def build_datasets(
    data_path: Optional[DataPath],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer: Tokenizer,
    num_samples: Sequence[Optional[int]],
    mock: bool = False,
    cache_dir: Optional[str] = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = False,
    is_built_on_rank: Callable[[], bool] = lambda: True,
):
    """Train/valid/test GPT datasets (each possibly None) via megatron-core.

    ``num_samples`` is the number of samples wanted per split. Items are dicts of ``tokens``,
    ``labels``, ``loss_mask``, ``position_ids`` (and ``attention_mask`` only when
    ``create_attention_mask``: causal masking is left to the attention kernel by default).
    Blended splits also carry ``dataset_id``. ``cache_dir`` holds megatron's shuffle/sample
    indices when torch.distributed is initialized; it defaults to ``index-cache`` next to the
    first data prefix. ``mock`` ignores ``data_path`` and uses ``MockGPTDataset``.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    from megatron_looprpt.data.masked_gpt_dataset import MaskedGPTDataset

    ensure_dataset_helpers()
    blend = None
    if not mock:
        if not data_path:
            raise ValueError("--data-path is required unless --mock-data is set")
        blend = validate_data_prefixes(data_path)
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(os.path.abspath(blend[0][0])), "index-cache")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        # BlendedDataset calls torch.distributed.get_rank() on a cache miss without checking
        # that a process group exists, so without one we leave caching to megatron's defaults:
        # GPTDataset indices under <prefix>/cache/, blend indices rebuilt in memory.
        path_to_cache=cache_dir if distributed else None,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    if not mock:
        _check_splits_nonempty(blend[0], config.split_matrix, split)
    cls = MockGPTDataset if mock else MaskedGPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, list(num_samples), is_built_on_rank, config)
    return tuple(builder.build())


# ---------------------------------------------------------------------------------------------
# Batches


class PretrainingSampler:
    """Batch sampler with Megatron-LM's MegatronPretrainingSampler order.

    Samples are taken in dataset order (the datasets are already shuffled) starting at
    ``consumed_samples``; each step takes ``micro_batch_size * dp_size`` consecutive samples and
    rank ``dp_rank`` gets its contiguous slice. The global order therefore does not depend on
    ``dp_size``, and resuming from ``consumed_samples`` replays exactly the unseen samples.
    Incomplete final steps are dropped.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} is outside the dataset's "
                f"{total_samples} samples"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self) -> int:
        step = self.micro_batch_size * self.dp_size
        return (self.total_samples - self.consumed_samples) // step

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for i in range(len(self)):
            beg = first + i * step
            yield list(range(beg, beg + self.micro_batch_size))


def build_data_iterator(
    dataset,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Optional[Iterator[Dict[str, torch.Tensor]]]:
    """Iterator of collated micro-batches (batch dim first) for this data-parallel rank, or None
    when ``dataset`` is None (a split that was not built). ``num_workers`` processes build the
    micro-batches ahead of use (the order is the sampler's either way); ``pin_memory`` puts them
    in page-locked memory, from which a host-to-device copy does not block the host."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank,
                                 dp_size)
    loader = torch.utils.data.DataLoader(_WithSampleIds(dataset), batch_sampler=sampler,
                                         num_workers=num_workers, pin_memory=pin_memory)
    return iter(loader)


class _WithSampleIds(torch.utils.data.Dataset):
    """Adds each item's global sample index as ``sample_ids``: randomness that must not depend
    on the parallel layout (LoopRPT's rollouts) is keyed by it."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {**self.dataset[index], "sample_ids": torch.tensor(index, dtype=torch.long)}
