"""Sample continuations from a looped-LM checkpoint, with a KV cache for every loop step.

    python tools/generate.py --load runs/quickstart/looprpt --prompt "def main(" --max-new-tokens 40
    torchrun --nproc-per-node 4 tools/generate.py --load ckpt --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --prompts-file prompts.jsonl --output samples.jsonl

Prompts come from --prompt (repeatable) or a JSONL file ({"prompt": ...} per line). The next
token is read from the last loop step, a fixed --exit-step, or per token by Q-exit at
--exit-threshold (all loop steps run: later positions attend to every step's cache). Prints each
prompt with its continuation; --output writes JSONL (prompt, completion, token ids, log-probs,
exit steps).
"""

import argparse
import json
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, _REPO_ROOT)

from megatron_looprpt.import_notes import silence_import_notes  # noqa: E402
from megatron_looprpt.deferred_compile import defer_megatron_compiles  # noqa: E402

silence_import_notes()
defer_megatron_compiles()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint (a save directory or one iter_* directory)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help='JSONL with {"prompt": ...} per line')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at-eod", action="store_true", help="stop a sequence at the tokenizer's end-of-document token")
    p.add_argument("--exit-step", type=int, default=None, help="1-based loop step whose logits are sampled (default: the last)")
    p.add_argument("--exit-threshold", type=float, default=None, help="Q-exit per token at this q instead")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--tokenizer-model", default=None, help="the tokenizer file, if it moved since training")
    p.add_argument("--output", default=None, help="write the samples here as JSONL")
    return p


def read_prompts(args) -> list:
    from megatron_looprpt.arguments import ConfigError

    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise ConfigError(f"--prompts-file {args.prompts_file} does not exist")
        with open(args.prompts_file) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        prompts.append(json.loads(line)["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ConfigError(f"--prompts-file {args.prompts_file} line {number}: expected "
                                          '{"prompt": "..."}') from None
    if not prompts:
        raise ConfigError("give at least one --prompt or a --prompts-file")
    return prompts


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from megatron_looprpt import parallel
    from megatron_looprpt.arguments import ConfigError
    from megatron_looprpt.inference.checkpoint import load_for_inference
    from megatron_looprpt.inference.generation import SamplingConfig, generate
    from megatron_looprpt.training.checkpointing import CheckpointError

    try:
        prompts = read_prompts(args)
        model = load_for_inference(args.load, args.tensor_model_parallel_size,
                                   args.pipeline_model_parallel_size, args.tokenizer_model)
        steps = model.args.loop_steps
        if args.exit_step is not None and not 1 <= args.exit_step <= steps:
            raise ConfigError(f"--exit-step {args.exit_step} must be in [1, {steps}] (the model's loop steps)")
        cfg = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            seed=args.seed, stop_tokens=(model.tokenizer.eod,) if args.stop_at_eod else (),
            exit_step=None if args.exit_step is None else args.exit_step - 1,
            exit_threshold=args.exit_threshold)
        token_prompts = [model.tokenizer.tokenize(p) for p in prompts]
        out = generate(model.pm, token_prompts, model.vocab_size, cfg)
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        parallel.destroy()
        return 2
    if dist.get_rank() == 0:
        rows = [{"prompt": p, "completion": model.tokenizer.detokenize(t), "tokens": t, "logprobs": lp,
                 "exit_steps": s} for p, t, lp, s in zip(prompts, out.tokens, out.logprobs, out.exit_steps)]
        for row in rows:
            print(f"--- {row['prompt']!r}\n{row['completion']}")
        if args.output:
            with open(args.output, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
