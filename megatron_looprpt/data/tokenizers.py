"""Tokenizers behind one small interface, plus SentencePiece training.

Every tokenizer exposes ``vocab_size``, ``tokenize``, ``detokenize``, ``eod`` and ``pad``.
megatron-core's GPTDataset duck-types its tokenizer: it reads ``vocab_size``, ``eod`` and
``pad``, and json-dumps ``unique_identifiers`` into the hash that names its index cache, so
that attribute is part of the interface too.
"""

import os
from collections import OrderedDict
from typing import Iterable, Iterator, List, Optional, Sequence

from megatron_looprpt.data.corpus import read_documents

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")

# Ids our own SentencePiece models reserve; a real pad id keeps padded batches embeddable.
SP_UNK_ID, SP_BOS_ID, SP_EOS_ID, SP_PAD_ID = 0, 1, 2, 3

_HF_EOD_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "<|im_end|>")
_HF_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")


class Tokenizer:
    """Interface. ``pad`` is -1 when the vocabulary has no pad token (Megatron's convention;
    GPTDataset then pads samples with -1 internally and masks those positions)."""

    vocab_size: int
    eod: int
    pad: int

    def __init__(self, path: Optional[str], **options) -> None:
        self.unique_identifiers = OrderedDict(class_name=type(self).__name__, path=path, **options)

    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: str) -> None:
        import sentencepiece

        super().__init__(os.path.abspath(model_path))
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"SentencePiece model {model_path} defines no end-of-sentence piece")
        self.pad = self._sp.pad_id()

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizerJson(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (or a directory holding one), via ``tokenizers``."""

    def __init__(self, tokenizer_json_path: str) -> None:
        if os.path.isdir(tokenizer_json_path):
            tokenizer_json_path = os.path.join(tokenizer_json_path, "tokenizer.json")
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as err:
            raise ImportError(
                "HuggingFaceTokenizer needs the 'tokenizers' package: pip install tokenizers"
            ) from err
        super().__init__(os.path.abspath(tokenizer_json_path))
        self._tok = _HFTokenizer.from_file(tokenizer_json_path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eod = self._first_id(_HF_EOD_TOKENS)
        if eod is None:
            raise ValueError(
                f"{tokenizer_json_path} has none of the end-of-document tokens {_HF_EOD_TOKENS}"
            )
        self.eod = eod
        pad = self._first_id(_HF_PAD_TOKENS)
        self.pad = -1 if pad is None else pad

    def _first_id(self, tokens: Iterable[str]) -> Optional[int]:
        for token in tokens:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(Tokenizer):
    """For mock data: text is whitespace-separated integer ids; the last id is the eod."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__(None, vocab_size=int(vocab_size))
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1
        self.pad = -1

    def tokenize(self, text: str) -> List[int]:
        return [int(tok) for tok in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None
) -> Tokenizer:
    """Build a tokenizer from Megatron-LM style arguments (``--tokenizer-type`` etc.)."""
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 2:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size >= 2")
        return NullTokenizer(vocab_size)
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}"
        )
    if not tokenizer_model:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"--tokenizer-model {tokenizer_model} does not exist")
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    return HFTokenizerJson(tokenizer_model)


def model_vocab_size(tokenizer: Tokenizer, vocab_size: Optional[int]) -> int:
    """The model's (unpadded) vocabulary: the tokenizer's, or ``--vocab-size`` when that is
    larger (a Hugging Face config may size the embedding beyond its tokenizer's tokens)."""
    return max(tokenizer.vocab_size, vocab_size or 0)


def train_sentencepiece(
    inputs: Sequence[str],
    output_prefix: str,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    json_keys: Sequence[str] = ("text",),
    input_sentence_size: int = 300_000,
    num_threads: Optional[int] = None,
) -> str:
    """Train a SentencePiece model on the lines of ``inputs``; returns ``{output_prefix}.model``.

    Lossless settings: identity normalization, whitespace kept, byte fallback (no unk on code or
    unseen characters) and newline as its own piece, since documents are trained line by line.
    Digits are split one per piece so arithmetic is tokenized uniformly.
    """
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path} does not exist")

    def lines() -> Iterator[str]:
        for path in inputs:
            for record in read_documents(path, json_keys):
                for doc in record.values():
                    yield from (line for line in doc.split("\n") if line.strip())

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    try:
        _train(lines(), output_prefix, vocab_size, model_type, input_sentence_size, num_threads)
    except RuntimeError as err:
        if "Vocabulary size too high" not in str(err):
            raise
        # SentencePiece names the largest vocabulary the input supports at the end.
        raise ValueError(f"--vocab-size {vocab_size} is too large for --input: "
                         f"{str(err).split('] ')[-1]}") from None
    return output_prefix + ".model"


def _train(lines: Iterator[str], output_prefix: str, vocab_size: int, model_type: str,
           input_sentence_size: int, num_threads: Optional[int]) -> None:
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        unk_id=SP_UNK_ID,
        bos_id=SP_BOS_ID,
        eos_id=SP_EOS_ID,
        pad_id=SP_PAD_ID,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
