"""Convert checkpoints between Hugging Face Ouro and megatron_looprpt (megatron-core) formats.

    # Hugging Face Ouro -> ours, ready for --load under TP=2, PP=2
    python tools/checkpoint/convert.py --source-format hf --target-format mcore \
        --load-dir Ouro-1.4B --save-dir ckpt/ouro-1.4b --target-tensor-parallel-size 2 \
        --target-pipeline-model-parallel-size 2
    # ours -> Hugging Face (loads with transformers + Ouro's remote code), bf16, 2 GB shards
    python tools/checkpoint/convert.py --source-format mcore --target-format hf \
        --load-dir runs/looprpt --save-dir export/ouro-looprpt --dtype bf16
    # ours -> ours for another layout (re-pads the vocabulary; weights only)
    python tools/checkpoint/convert.py --source-format mcore --target-format mcore \
        --load-dir runs/ckpt --save-dir ckpt/tp4 --target-tensor-parallel-size 4

Memory stays near one layer of one weight kind plus the embedding, whatever the model size.
Tokenizer files and Ouro's remote code travel with the weights (in ``hf_assets/`` of a
megatron checkpoint).
"""

import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO_ROOT not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, _REPO_ROOT)

from megatron_looprpt.import_notes import silence_import_notes  # noqa: E402
from megatron_looprpt.deferred_compile import defer_megatron_compiles  # noqa: E402

silence_import_notes()
defer_megatron_compiles()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert.py", description=__doc__.splitlines()[0])
    p.add_argument("--source-format", required=True, help="hf or mcore")
    p.add_argument("--target-format", required=True, help="hf or mcore")
    p.add_argument("--load-dir", required=True,
                   help="source: a Hugging Face model directory, or a checkpoint save directory / iter_* directory")
    p.add_argument("--save-dir", required=True, help="target directory (new or empty)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="mcore target: the TP size it will be loaded with (sets the vocabulary padding; default 1)")
    p.add_argument("--target-pipeline-model-parallel-size", type=int, default=None,
                   help="mcore target: the PP size it will be loaded with (checked to divide the layers; default 1)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="mcore target: pad the vocabulary to a multiple of this x TP (default: a megatron "
                        "source's, else 128, as pretraining)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the source's)")
    p.add_argument("--max-shard-size", default="2GB", help="hf target: largest safetensors shard (default 2GB)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="mcore source: the true vocabulary, when neither its saved config nor its tokenizer gives it")
    p.add_argument("--source-model", choices=["student", "teacher"], default="student",
                   help="mcore source: the trained model or LoopRPT's EMA teacher (default: student)")
    p.add_argument("--hf-assets", default=None,
                   help="a directory whose files (tokenizer, Ouro's configuration_ouro.py / modeling_ouro.py, "
                        "generation_config.json) are added to the target")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_looprpt.conversion.convert import ConversionError, ConvertOptions, convert

    try:
        written = convert(ConvertOptions(**vars(args)))
    except ConversionError as error:
        print(f"convert.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
