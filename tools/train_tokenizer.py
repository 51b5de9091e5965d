"""Train a SentencePiece tokenizer on JSONL or plain-text files.

    python tools/train_tokenizer.py --input data/text.jsonl data/reasoning.jsonl \
        --vocab-size 4096 --output-prefix data/tokenizer
"""

import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, _REPO_ROOT)

from megatron_looprpt.data.tokenizers import train_sentencepiece  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl/.json files (read via --json-keys) or text files (per line)")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--input-sentence-size", type=int, default=300_000,
                        help="lines sampled for training (keeps training fast on big inputs)")
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        model = train_sentencepiece(
            args.input, args.output_prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, json_keys=args.json_keys,
            input_sentence_size=args.input_sentence_size, num_threads=args.num_threads,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(model)


if __name__ == "__main__":
    main()
