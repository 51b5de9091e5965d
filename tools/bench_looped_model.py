"""Benchmark: the looped model against an unshared GPT of the same FLOPs, and memory per rank.

Throughput: forward+backward tokens/s of the looped model (N shared layers x T steps) against a
megatron-core GPTModel with N*T unshared layers (the same FLOPs apart from the T-1 extra
output layers and gates the looped model computes, which are counted and reported), measured
in one process, alternating the two models over repeated trials so both see the same
machine state. Reported as a ratio (looped / unshared).

Memory: parameter + gradient + optimizer-state bytes per rank of the looped model under each
layout given with --layouts (TPxPP), computed from the parameters each rank really holds,
launched with torchrun.

    python tools/bench_looped_model.py                       # throughput, CPU-sized model
    python tools/bench_looped_model.py --memory --layouts 1x1 2x1 1x2 2x2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import add_shape_args, timed  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--memory", action="store_true", help="measure memory per rank instead")
    p.add_argument("--layouts", nargs="*", default=["1x1", "2x1", "1x2", "2x2"])
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    return p.parse_args()


def model_cfg(a, tp=1, pp=1):
    from megatron_looprpt.models.builder import LoopedModelConfig

    return LoopedModelConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        ffn_hidden_size=a.ffn_hidden_size, vocab_size=a.vocab_size,
        max_position_embeddings=a.seq_length, loop_steps=a.loop_steps, bf16=a.bf16,
        tensor_parallel=tp, pipeline_parallel=pp,
    )


def throughput(a) -> dict:
    import torch
    from megatron.core.models.gpt import GPTModel

    from megatron_looprpt import parallel
    from megatron_looprpt.models.builder import build_stage, transformer_config
    from megatron_looprpt.models.init_weights import init_weights
    from megatron_looprpt.models.layer_specs import sandwich_layer_spec
    from megatron_looprpt.models.looped_gpt import HeadRequest
    from megatron_looprpt.models.loss import stage1_token_loss
    from megatron_looprpt.training.flops import FlopShape, forward_flops_per_token

    device = parallel.initialize(1, 1, seed=1)
    cfg = model_cfg(a)
    looped = build_stage(cfg)
    init_weights(looped, seed=1, std=0.02, effective_depth=cfg.num_layers * cfg.loop_steps)
    unshared_cfg = transformer_config(cfg)
    unshared_cfg.num_layers = cfg.num_layers * cfg.loop_steps
    unshared = GPTModel(
        config=unshared_cfg, transformer_layer_spec=sandwich_layer_spec("local"),
        vocab_size=cfg.padded_vocab_size, max_sequence_length=a.seq_length,
        position_embedding_type="rope", share_embeddings_and_output_weights=False,
    ).to(device)
    tokens = torch.randint(0, a.vocab_size, (a.micro_batch_size, a.seq_length + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(a.seq_length, device=device).expand(a.micro_batch_size, -1)

    def step_looped():
        out = looped(inputs, positions, None, labels=labels)
        stage1_token_loss(out.stack("label_logprobs"), out.stack("gate_logits"), 0.05).mean().backward()

    # Like the unshared model: one vocabulary head and no head recomputation (a memory choice that
    # has nothing to do with looping).
    last_step_only = HeadRequest(vocab_steps=(cfg.loop_steps - 1,), recompute=False)

    def step_looped_block():
        # The looped block alone: the vocabulary head runs once, as in the unshared model.
        out = looped(inputs, positions, None, labels=labels, head=last_step_only)
        (out.steps[-1].label_logprobs.mean() + out.stack("gate_logits").mean()).backward()

    def step_unshared():
        unshared(inputs, positions, None, labels=labels).float().mean().backward()

    for _ in range(a.warmup):
        step_looped()
        step_looped_block()
        step_unshared()
    looped_times, block_times, unshared_times = [], [], []
    for _ in range(a.trials):
        looped_times.append(timed(step_looped, device))
        block_times.append(timed(step_looped_block, device))
        unshared_times.append(timed(step_unshared, device))
    tokens_per_step = a.micro_batch_size * a.seq_length
    looped_tps = tokens_per_step / statistics.median(looped_times)
    block_tps = tokens_per_step / statistics.median(block_times)
    unshared_tps = tokens_per_step / statistics.median(unshared_times)
    shape = FlopShape(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_attention_heads,
                      cfg.ffn_hidden_size, cfg.padded_vocab_size, a.seq_length, cfg.loop_steps)
    unshared_shape = FlopShape(cfg.num_layers * cfg.loop_steps, cfg.hidden_size, cfg.num_attention_heads,
                               cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.padded_vocab_size,
                               a.seq_length, 1)
    flop_ratio = forward_flops_per_token(shape) / forward_flops_per_token(unshared_shape)
    return {
        "device": str(device),
        "looped_tokens_per_sec": looped_tps,
        "looped_block_tokens_per_sec": block_tps,
        "unshared_tokens_per_sec": unshared_tps,
        "block_ratio": block_tps / unshared_tps,
        "ratio": looped_tps / unshared_tps,
        "flop_ratio": flop_ratio,
        "flop_normalised_ratio": looped_tps * flop_ratio / unshared_tps,
        "looped_params": sum(p.numel() for p in looped.parameters()),
        "unshared_params": sum(p.numel() for p in unshared.parameters()),
    }


def memory_worker(a) -> None:
    import torch.distributed as dist

    from megatron_looprpt import parallel
    from megatron_looprpt.models.builder import build_model
    from megatron_looprpt.training.setup import OptimConfig, build_optimizer

    parallel.initialize(a.tp, a.pp, seed=1)
    cfg = model_cfg(a, a.tp, a.pp)
    pm = build_model(cfg, seed=1, use_distributed_optimizer=True)
    optimizer, _ = build_optimizer(pm, cfg, OptimConfig(use_distributed_optimizer=True))
    params = list(pm.model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(buffer.grad_data.numel() * buffer.grad_data.element_size() for buffer in pm.stage.buffers)
    # Adam state (exp_avg, exp_avg_sq) and fp32 main params exist only for this rank's shard.
    state_bytes = 0
    for state in optimizer.optimizer.state.values():
        state_bytes += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel") and v.dim() > 0)
    row = {"rank": dist.get_rank(), "params": sum(p.numel() for p in params),
           "param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_state_bytes": state_bytes}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0 and a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f)
    parallel.destroy()


def memory(a) -> list:
    import tempfile

    results = []
    for layout in a.layouts:
        tp, pp = (int(x) for x in layout.split("x"))
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp * pp}",
                   f"--master-port={_free_port()}", __file__, "--memory-worker", "--tp", str(tp), "--pp", str(pp),
                   "--out", out.name, "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
                   "--num-attention-heads", str(a.num_attention_heads), "--ffn-hidden-size",
                   str(a.ffn_hidden_size), "--vocab-size", str(a.vocab_size), "--seq-length",
                   str(a.seq_length), "--loop-steps", str(a.loop_steps)]
            env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
            rows = json.load(open(out.name))
        worst = max(r["param_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"] for r in rows)
        results.append({"layout": f"TP={tp} PP={pp}", "max_bytes_per_rank": worst, "ranks": rows})
    return results


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    a = parse()
    if a.memory_worker:
        memory_worker(a)
        return
    if a.memory:
        results = memory(a)
        base = results[0]["max_bytes_per_rank"]
        print(f"{'layout':<14} {'params+grads+optimizer / rank':>30} {'vs first':>9}")
        for r in results:
            print(f"{r['layout']:<14} {r['max_bytes_per_rank'] / 2**20:>27.2f} MiB {r['max_bytes_per_rank'] / base:>9.3f}")
    else:
        results = throughput(a)
        print(json.dumps(results, indent=2))
        print(f"looped block (head once) / unshared tokens/s = {results['block_ratio']:.3f} (same FLOPs)")
        print(f"looped training step (head every step) / unshared tokens/s = {results['ratio']:.3f}; "
              f"it does {results['flop_ratio']:.3f}x the FLOPs (T-1 extra output layers), "
              f"FLOP-normalised ratio {results['flop_normalised_ratio']:.3f}")
    if a.out and not a.memory_worker:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
