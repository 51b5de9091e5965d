"""Sample from a tiny looped model under a given TP x PP layout and dump the tokens (torchrun)."""

from megatron_looprpt.deferred_compile import defer_megatron_compiles

defer_megatron_compiles()  # before megatron-core is imported: a faster start

import argparse
import json

import torch.distributed as dist

from megatron_looprpt import parallel
from megatron_looprpt.inference.generation import SamplingConfig, generate
from megatron_looprpt.models.builder import LoopedModelConfig, build_model

# five prompts: under PP=2 the batch is padded to a multiple of the pipeline size
PROMPTS = [[5, 9, 13, 2], [7, 1], [3, 3, 8, 11, 40, 2, 6], [100], [42, 43, 44]]
VOCAB = 200


def build(tp: int, pp: int = 1, **loop_options):
    cfg = LoopedModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        vocab_size=VOCAB, max_position_embeddings=64, loop_steps=3, tensor_parallel=tp, pipeline_parallel=pp,
        make_vocab_size_divisible_by=64, untie_embeddings_and_output_weights=True, **loop_options,
    )
    return build_model(cfg, seed=21, wrap_ddp=False)


def run(model, **overrides):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=4, **overrides)
    out = generate(model, PROMPTS, VOCAB, cfg)
    return {"tokens": out.tokens, "logprobs": out.logprobs, "exit_steps": out.exit_steps}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    parallel.initialize(a.tp, a.pp, seed=3)
    model = build(a.tp, a.pp)
    result = {"fixed": run(model), "q_exit": run(model, exit_threshold=0.6),
              "recomputed": run(model, use_cache=False)}
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(result, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
