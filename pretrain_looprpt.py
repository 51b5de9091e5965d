"""Pre-train a looped language model (and run LoopRPT) on megatron-core.

    torchrun --nproc-per-node 8 pretrain_looprpt.py --model-size ouro-1.4b --data-path ... [flags]
    python pretrain_looprpt.py            # no arguments: the CPU quickstart (see README)

Run ``python pretrain_looprpt.py --help`` for every flag.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_looprpt.import_notes import silence_import_notes  # noqa: E402
from megatron_looprpt.deferred_compile import defer_megatron_compiles  # noqa: E402

silence_import_notes()
defer_megatron_compiles()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from megatron_looprpt.arguments import ConfigError, parse_args

    try:
        if not argv:
            from megatron_looprpt.quickstart import run_quickstart

            run_quickstart()
        else:
            args = parse_args(argv)
            from megatron_looprpt.training.loop import pretrain

            pretrain(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"pretrain_looprpt.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        if "megatron_looprpt.parallel" in sys.modules:
            sys.modules["megatron_looprpt.parallel"].destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
