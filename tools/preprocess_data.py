"""Tokenize documents into megatron-core indexed datasets (Megatron-LM's preprocess_data).

    python tools/preprocess_data.py --input data/text.jsonl --output-prefix data/text \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer.model \
        --append-eod --workers 2

writes data/text_text_document.bin/.idx (one pair per --json-keys key). With --prompt-key P each
record's --json-keys fields are completions of its field P: the document is prompt + completion,
and data/<prefix>_<key>_loss_mask.bin/.idx beside it makes only the completion count in the loss.
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
    parser.add_argument("--prompt-key", default=None,
                        help="jsonl field prepended to each document and left out of the loss "
                             "(prompt/completion data: only the --json-keys text is trained on)")
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
            log_interval=args.log_interval, prompt_key=args.prompt_key,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    for prefix in prefixes.values():
        print(prefix)


if __name__ == "__main__":
    main()
