"""Tokenize documents into megatron-core indexed datasets (Megatron-LM's preprocess_data).

    python tools/preprocess_data.py --input data/text.jsonl --output-prefix data/text \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer.model \
        --append-eod --workers 2

writes data/text_text_document.bin/.idx (one pair per --json-keys key). With --segments every
--json-keys field is a list of text segments alternating context and trained text, e.g.
{"text": ["Question: 2 + 3 =", " 5"]}: the document is their concatenation, and
data/<prefix>_<key>_loss_mask.bin/.idx beside it makes only the trained segments count in the loss.
"""

import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, _REPO_ROOT)

from megatron_looprpt.data.corpus import INPUT_FORMATS  # noqa: E402
from megatron_looprpt.data.datasets import preprocess_jsonl  # noqa: E402
from megatron_looprpt.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="jsonl",
                        help="jsonl; text: blank-line-separated documents; lines: one per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--segments", action="store_true",
                        help="--json-keys fields are lists of segments alternating context and trained text "
                             "(prompt/completion data: [prompt, completion]); only trained ones count in the loss")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, required=True)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    parser.add_argument("--append-eod", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=64, help="documents per worker task")
    parser.add_argument("--log-interval", type=int, default=10_000)
    args = parser.parse_args(argv)
    try:
        prefixes = preprocess_jsonl(
            args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
            args.vocab_size, json_keys=args.json_keys, input_format=args.input_format,
            append_eod=args.append_eod, workers=args.workers, chunk_size=args.chunk_size,
            log_interval=args.log_interval, segments=args.segments,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    for prefix in prefixes.values():
        print(prefix)


if __name__ == "__main__":
    main()
