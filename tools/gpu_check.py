"""The device check: what the CPU tests cannot show, measured on one GPU in one command.

    python tools/gpu_check.py --out runs/gpu_check          # one H100/H200, at most ~8 minutes
    python tools/gpu_check.py --dry-run --out /tmp/check    # CPU: imports, shapes, plumbing

Checks, in this order (one GPU means PP=1; the loop chunks are built and driven directly):

  environment            CUDA device, its MFU peak, Transformer Engine and apex kernels
  fp8_weight_refresh     a weight change reaches TE's cached FP8 weights through loop chunk 0's
                         set_is_first_microbatch, and is missed without it (the PP>1 bug)
  te_vs_local_parity     per-step logits and gate logits of the sandwich spec at an Ouro width,
                         Transformer Engine layers against megatron-core's local layers (bf16)
  fusion_parity          local layers with the GPU's fused SwiGLU, RoPE (and softmax where apex
                         is installed) against the unfused kernels
  grad_accumulation      TE's fused weight-gradient accumulation into the fp32 main grads gives
                         the gradients of the unfused path with T uses of each weight
  local_without_apex     local layers train on the GPU whether or not apex's kernels exist
  fp8_generation         an FP8-trained checkpoint decodes (cached = recomputed), and so does
                         the FP8 training policy itself (token-level RL rollouts)
  train_bf16, train_fp8  tokens/s, TFLOP/s and MFU at hidden 2048, 4096 tokens, T=4
  looprpt_vs_lm          a LoopRPT iteration (teacher, G=8 rollouts, EMA) against an LM one

Writes OUT/gpu_check.json and prints a table; every check records its peak GPU memory. A check
that raises or misses its bar is FAILED and the command exits 1 (after running the others);
one not started because --budget-s ran out counts as failed too. --dry-run runs every check's
code path at a tiny shape on the CPU (local layers, fp32, no FP8): what needs Transformer Engine
or a GPU is reported as such, nothing is judged, and it exits 1 only if something raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, ROOT)

from megatron_looprpt.import_notes import silence_import_notes  # noqa: E402
from megatron_looprpt.deferred_compile import defer_megatron_compiles  # noqa: E402

silence_import_notes()
defer_megatron_compiles()


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes of one run of the check."""

    dry_run: bool
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq: int                 # training tokens per micro-batch (micro-batch size 1)
    loops: int
    small_layers: int        # models that check correctness
    speed_layers: int        # models that are timed
    parity_seq: int
    microbatches: int
    warmup_iters: int
    timed_iters: int
    rollouts: int
    new_tokens: int


GPU_PLAN = Plan(dry_run=False, hidden=2048, heads=16, ffn=5632, vocab=49152, seq=4096, loops=4,
                small_layers=2, speed_layers=4, parity_seq=1024, microbatches=2, warmup_iters=2,
                timed_iters=5, rollouts=8, new_tokens=16)
DRY_PLAN = Plan(dry_run=True, hidden=64, heads=4, ffn=96, vocab=256, seq=32, loops=2, small_layers=2,
                speed_layers=2, parity_seq=32, microbatches=2, warmup_iters=1, timed_iters=1, rollouts=2,
                new_tokens=4)
# prompt lengths that are not multiples of 8/16, which FP8 GEMMs would refuse
PROMPT_LENGTHS = (5, 17, 33)


class Skip(Exception):
    """The check cannot run here (and says why)."""


class Failed(Exception):
    """The check ran and missed its bar."""


def _have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _impl(plan: Plan) -> str:
    return "local" if plan.dry_run else "transformer_engine"


def _config(plan: Plan, layers: int, *, impl: str, fp8: bool, seq: int = None, **overrides):
    from megatron_looprpt.models.builder import LoopedModelConfig

    bf16 = not plan.dry_run
    return LoopedModelConfig(
        num_layers=layers, hidden_size=plan.hidden, num_attention_heads=plan.heads, ffn_hidden_size=plan.ffn,
        vocab_size=plan.vocab, max_position_embeddings=seq or plan.seq, loop_steps=plan.loops,
        rotary_base=1000000, transformer_impl=impl, bf16=bf16,
        fp8_format="hybrid" if fp8 and not plan.dry_run else None, **overrides,
    )


def _batches(plan: Plan, count: int, seq: int, seed: int):
    import torch

    from megatron_looprpt.device import to_device

    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(count):
        tokens = torch.randint(0, plan.vocab, (1, seq + 1), generator=g)
        out.append(to_device({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq),
                              "position_ids": torch.arange(seq).unsqueeze(0),
                              "sample_ids": torch.tensor([seed * 1000 + m])}))
    return out


def _sync():
    import torch

    from megatron_looprpt.device import use_cuda

    if use_cuda():
        torch.cuda.synchronize()


def _rel(a, b) -> float:
    """Relative L2 distance of b from a."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _logits_head():
    from megatron_looprpt.models.looped_gpt import HeadRequest

    return HeadRequest(label_logprobs=False, logits=True, recompute=False)


# -- the checks ---------------------------------------------------------------------------------

def check_environment(plan: Plan) -> dict:
    import torch

    from megatron_looprpt.device import use_cuda
    from megatron_looprpt.models import fusions
    from megatron_looprpt.training.flops import peak_tflops

    figures = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": use_cuda(),
               "transformer_engine": None,
               "apex_softmax_kernels": fusions.apex_softmax_available(),
               "apex_gradient_accumulation_kernel": fusions.apex_gradient_accumulation_available()}
    if _have_te():
        import transformer_engine

        figures["transformer_engine"] = getattr(transformer_engine, "__version__", "unknown")
    if use_cuda():
        figures["device"] = torch.cuda.get_device_name()
        figures["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        for precision in ("bf16", "fp8"):
            peak = peak_tflops(precision)
            figures[f"peak_{precision}"] = None if peak is None else f"{peak.sku} {peak.tflops:.0f} TFLOP/s"
    if not plan.dry_run:
        if not use_cuda():
            raise Failed("no CUDA device (or LOOPRPT_FORCE_CPU=1): the device check needs one")
        if figures["transformer_engine"] is None:
            raise Failed("Transformer Engine is not importable: pip install -e .[gpu]")
        if figures["peak_bf16"] is None:
            raise Failed(f"no MFU peak known for {figures['device']}: add it to training/flops.py _PEAKS")
    return figures


def check_fp8_weight_refresh(plan: Plan) -> dict:
    import torch

    from megatron_looprpt.models.pipeline import LoopStepChunk
    from megatron_looprpt.models.builder import build_model

    cfg = _config(plan, plan.small_layers, impl=_impl(plan), fp8=True, seq=plan.parity_seq)
    pm = build_model(cfg, seed=3, wrap_ddp=False)
    model = pm.model
    model.loops_inside = False
    chunks = [LoopStepChunk(pm.stage, model, v, model.config) for v in range(plan.loops)]
    batch = _batches(plan, 1, plan.parity_seq, seed=1)[0]

    @torch.no_grad()
    def run(first_microbatch: bool):
        """One micro-batch through the T chunks as megatron's schedule drives them: each chunk's
        set_is_first_microbatch on the step's first micro-batch, then its forward."""
        hidden = None
        for chunk in chunks:
            if first_microbatch:
                chunk.set_is_first_microbatch()
            if chunk.loop_step:
                chunk.set_input_tensor(hidden)
            hidden = chunk(batch["tokens"], batch["position_ids"], None, head=_logits_head())
        model.clear_deferred_steps()
        return hidden.steps[-1].logits.float()

    pm.eval()
    run(first_microbatch=True)
    # What an optimizer step does: the weights change in place. Noise, not a scale: Ouro's
    # sandwich norms would normalise a scaled projection's output back.
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("linear_qkv.weight", "linear_fc1.weight")):
                param.add_(torch.randn(param.shape, generator=generator).to(param) * param.float().std())
    stale = run(first_microbatch=False)       # a later micro-batch: the cache is meant to be used
    refreshed = run(first_microbatch=True)    # the next step's first micro-batch
    cached = run(first_microbatch=False)      # the cache now holds the changed weights
    figures = {"refreshed_vs_cached": _rel(cached, refreshed), "stale_vs_cached": _rel(cached, stale)}
    if plan.dry_run:
        return figures
    # delayed scaling moves its scales between calls: "equal" is relative
    if not (figures["refreshed_vs_cached"] < 0.02 and figures["stale_vs_cached"] > 0.1):
        raise Failed(f"a weight change did not reach the FP8 weights through loop chunk 0: {figures}")
    return figures


def check_te_vs_local_parity(plan: Plan) -> dict:
    import torch

    from megatron_looprpt.models.builder import build_model

    if not plan.dry_run and not _have_te():
        raise Skip("needs Transformer Engine")
    batch = _batches(plan, 1, plan.parity_seq, seed=2)[0]
    outputs = {}
    for impl in ("local", "transformer_engine"):
        if impl == "transformer_engine" and plan.dry_run:
            continue
        pm = build_model(_config(plan, plan.small_layers, impl=impl, fp8=False, seq=plan.parity_seq),
                         seed=5, wrap_ddp=False)
        pm.eval()
        with torch.no_grad():
            out = pm.model(batch["tokens"], batch["position_ids"], None, head=_logits_head())
        outputs[impl] = ([s.logits.float().cpu() for s in out.steps], out.stack("gate_logits").float().cpu(),
                         sum(float(p.float().sum()) for p in pm.model.parameters()))
        del pm, out
        gc.collect()
    local_logits, local_gates, local_sum = outputs["local"]
    assert len(local_logits) == plan.loops and local_logits[0].shape[-1] == _config(
        plan, 1, impl="local", fp8=False).padded_vocab_size
    if plan.dry_run:
        raise Skip("dry run: local layers only (the comparison needs Transformer Engine)")
    te_logits, te_gates, te_sum = outputs["transformer_engine"]
    figures = {"weight_sum_local": local_sum, "weight_sum_te": te_sum,
               "gate_rel": _rel(local_gates, te_gates)}
    for step, (a, b) in enumerate(zip(local_logits, te_logits)):
        figures[f"step{step + 1}_logits_rel"] = _rel(a, b)
        figures[f"step{step + 1}_top1_agreement"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    if not math.isclose(local_sum, te_sum, rel_tol=1e-3):
        raise Failed(f"the two models did not start from the same weights: {figures}")
    worst_rel = max(v for k, v in figures.items() if k.endswith("_rel"))
    worst_top1 = min(v for k, v in figures.items() if k.endswith("_agreement"))
    if worst_rel > 0.05 or worst_top1 < 0.95:
        raise Failed(f"Transformer Engine and local layers disagree beyond bf16 round-off: {figures}")
    return figures


def check_fusion_parity(plan: Plan) -> dict:
    import torch

    from megatron_looprpt.models.fusions import FusionRequest
    from megatron_looprpt.models.builder import build_model

    batch = _batches(plan, 1, plan.parity_seq, seed=8)[0]
    logits, settings = {}, {}
    for fused in (True, False):
        allowed = FusionRequest() if fused else FusionRequest(False, False, False, False)
        pm = build_model(_config(plan, plan.small_layers, impl="local", fp8=False, seq=plan.parity_seq,
                                 allowed_fusions=allowed), seed=5, wrap_ddp=False)
        pm.eval()
        config = pm.model.config
        settings[fused] = {name: getattr(config, name) for name in
                           ("bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion")}
        with torch.no_grad():
            out = pm.model(batch["tokens"], batch["position_ids"], None, head=_logits_head())
        logits[fused] = [step.logits.float().cpu() for step in out.steps]
        del pm, out
        gc.collect()
    figures = {"fused": settings[True]}
    for step, (a, b) in enumerate(zip(logits[False], logits[True])):
        figures[f"step{step + 1}_logits_rel"] = _rel(a, b)
        figures[f"step{step + 1}_top1_agreement"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    if plan.dry_run:
        return figures
    if not (settings[True]["bias_activation_fusion"] and settings[True]["apply_rope_fusion"]):
        raise Failed(f"the GPU did not choose the SwiGLU and RoPE fusions: {figures}")
    worst_rel = max(v for k, v in figures.items() if k.endswith("_rel"))
    worst_top1 = min(v for k, v in figures.items() if k.endswith("_agreement"))
    if worst_rel > 0.02 or worst_top1 < 0.97:
        raise Failed(f"fused and unfused kernels disagree beyond bf16 round-off: {figures}")
    return figures


def _train_once(plan: Plan, cfg, batches, seed: int = 7):
    """One training step of a DDP-wrapped model; returns the model (grads still in its buffers)."""
    from megatron_looprpt.models.loss import ExitLossConfig
    from megatron_looprpt.training.objectives import lm_objective
    from megatron_looprpt.models.builder import build_model
    from megatron_looprpt.training.setup import OptimConfig, build_optimizer
    from megatron_looprpt.schedule import make_forward_step, train_step

    pm = build_model(cfg, seed=seed)
    optimizer, scheduler = build_optimizer(pm, cfg, OptimConfig(lr=0.0, min_lr=0.0, global_batch_size=len(batches)))
    metrics = train_step(pm, optimizer, scheduler, batches, make_forward_step(partial(lm_objective, cfg=ExitLossConfig())),
                         len(batches))
    return pm, metrics


def check_grad_accumulation(plan: Plan) -> dict:
    import torch

    from megatron_looprpt.models.fusions import FusionRequest

    batches = _batches(plan, plan.microbatches, plan.parity_seq, seed=3)
    grads, settings = {}, {}
    for fused in (True, False):
        cfg = _config(plan, plan.small_layers, impl=_impl(plan), fp8=False, seq=plan.parity_seq,
                      allowed_fusions=FusionRequest(gradient_accumulation=fused))
        pm, _ = _train_once(plan, cfg, batches)
        config = pm.model.config
        settings[fused] = (config.gradient_accumulation_fusion, config.disable_parameter_transpose_cache)
        grads[fused] = torch.cat([buffer.grad_data.float().cpu() for buffer in pm.stage.buffers])
        del pm
        gc.collect()
    figures = {"fused_settings": settings[True], "unfused_settings": settings[False],
               "grad_rel": _rel(grads[False], grads[True]),
               "grad_cosine": float(torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0))}
    if plan.dry_run:
        return figures
    if settings[True] != (True, True):
        raise Failed(f"gradient accumulation fusion was not chosen with TE on the GPU: {figures}")
    if figures["grad_rel"] > 0.02 or figures["grad_cosine"] < 0.999:
        raise Failed(f"fused weight-gradient accumulation changes the gradients: {figures}")
    return figures


def check_local_without_apex(plan: Plan) -> dict:
    from megatron_looprpt.models import fusions

    cfg = _config(plan, plan.small_layers, impl="local", fp8=False, seq=plan.parity_seq)
    pm, metrics = _train_once(plan, cfg, _batches(plan, 1, plan.parity_seq, seed=4))
    config = pm.model.config
    loss = float(metrics["lm_loss"] / metrics["num_tokens"])
    figures = {"apex_softmax_kernels": fusions.apex_softmax_available(),
               "masked_softmax_fusion": config.masked_softmax_fusion,
               "gradient_accumulation_fusion": config.gradient_accumulation_fusion, "loss": loss}
    if not math.isfinite(loss):
        raise Failed(f"local layers gave a non-finite loss: {figures}")
    return figures


def check_fp8_generation(plan: Plan, work_dir: str) -> dict:
    from megatron_looprpt.arguments import parse_args
    from megatron_looprpt.inference.checkpoint import load_for_inference
    from megatron_looprpt.inference.generation import SamplingConfig, generate
    from megatron_looprpt.training import checkpointing
    from megatron_looprpt.training.loop import model_config

    flags = ["--num-layers", plan.small_layers, "--hidden-size", plan.hidden, "--num-attention-heads", plan.heads,
             "--ffn-hidden-size", plan.ffn, "--seq-length", plan.parity_seq, "--loop-steps", plan.loops,
             "--max-position-embeddings", max(plan.parity_seq, max(PROMPT_LENGTHS) + plan.new_tokens),
             "--rotary-base", 1000000, "--tokenizer-type", "NullTokenizer", "--vocab-size", plan.vocab,
             "--micro-batch-size", 1, "--global-batch-size", plan.microbatches, "--mock-data",
             "--transformer-impl", _impl(plan)]
    if not plan.dry_run:
        flags += ["--bf16", "--fp8-format", "hybrid"]
    args = parse_args([str(f) for f in flags], world_size=1)
    cfg = model_config(args, plan.vocab)
    pm, _ = _train_once(plan, cfg, _batches(plan, plan.microbatches, plan.parity_seq, seed=5))
    save_dir = os.path.join(work_dir, "fp8_checkpoint")
    checkpointing.save_checkpoint(save_dir, 1, pm, None, None, state={},
                                  args={**vars(args), "padded_vocab_size": cfg.padded_vocab_size})
    prompts = [[(7 * i + 3 * n) % plan.vocab for i in range(n)] for n in PROMPT_LENGTHS]
    greedy = SamplingConfig(max_new_tokens=plan.new_tokens, temperature=0.0)
    # the token-level RL path: rollouts from the FP8 training policy itself
    policy = generate(pm, prompts, plan.vocab, greedy)
    del pm
    gc.collect()
    inference = load_for_inference(save_dir)
    cached = generate(inference.pm, prompts, plan.vocab, greedy)
    recomputed = generate(inference.pm, prompts, plan.vocab, dataclasses.replace(greedy, use_cache=False))
    pairs = [(a, b) for ra, rb in zip(cached.tokens, recomputed.tokens) for a, b in zip(ra, rb)]
    figures = {"inference_fp8": inference.pm.model.config.fp8,
               "cached_vs_recomputed_agreement": sum(a == b for a, b in pairs) / max(len(pairs), 1),
               "first_tokens_agree": [ra[:1] == rb[:1] for ra, rb in zip(cached.tokens, recomputed.tokens)],
               "policy_tokens": [len(row) for row in policy.tokens]}
    if inference.pm.model.config.fp8 is not None:
        raise Failed(f"the inference model was built with FP8: {figures}")
    if plan.dry_run:
        return figures
    # bf16: a near-tie can flip a later greedy token between the two paths, not the first
    if not all(figures["first_tokens_agree"]) or figures["cached_vs_recomputed_agreement"] < 0.8:
        raise Failed(f"cached generation disagrees with recomputation: {figures}")
    return figures


def _timed_iterations(plan: Plan, step) -> float:
    for _ in range(plan.warmup_iters):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(plan.timed_iters):
        step()
    _sync()
    return (time.perf_counter() - start) / plan.timed_iters


def check_training(plan: Plan, fp8: bool) -> dict:
    from megatron_looprpt.models.loss import ExitLossConfig
    from megatron_looprpt.training.flops import FlopShape, peak_tflops, training_flops
    from megatron_looprpt.training.objectives import lm_objective
    from megatron_looprpt.models.builder import build_model
    from megatron_looprpt.training.setup import OptimConfig, build_optimizer
    from megatron_looprpt.schedule import make_forward_step, train_step

    cfg = _config(plan, plan.speed_layers, impl=_impl(plan), fp8=fp8)
    pm = build_model(cfg, seed=8)
    optimizer, scheduler = build_optimizer(pm, cfg, OptimConfig(lr=1e-4, global_batch_size=plan.microbatches))
    batches = _batches(plan, plan.microbatches, plan.seq, seed=6)
    forward_step = make_forward_step(partial(lm_objective, cfg=ExitLossConfig()))
    seconds = _timed_iterations(plan, lambda: train_step(pm, optimizer, scheduler, batches, forward_step,
                                                         plan.microbatches))
    tokens = plan.microbatches * plan.seq
    shape = FlopShape(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_attention_heads,
                      cfg.ffn_hidden_size, cfg.padded_vocab_size, plan.seq, cfg.loop_steps)
    tflops = training_flops(shape, tokens) / seconds / 1e12
    peak = peak_tflops("fp8" if cfg.fp8_format else "bf16")
    return {"layers": cfg.num_layers, "tokens_per_iteration": tokens, "iteration_s": seconds,
            "tokens_per_s": tokens / seconds, "tflops": tflops,
            "mfu": None if peak is None else tflops / peak.tflops, "peak": None if peak is None else peak.sku,
            "fp8": cfg.fp8_format}


def check_looprpt_vs_lm(plan: Plan) -> dict:
    from megatron_looprpt.models.loss import ExitLossConfig
    from megatron_looprpt.rl.looprpt_loss import LoopRPTConfig
    from megatron_looprpt.rl.objective import RolloutConfig, looprpt_train_step
    from megatron_looprpt.rl.teacher import EMATeacher
    from megatron_looprpt.training.objectives import lm_objective
    from megatron_looprpt.models.builder import build_model
    from megatron_looprpt.training.setup import OptimConfig, build_optimizer
    from megatron_looprpt.schedule import make_forward_step, train_step

    cfg = _config(plan, plan.speed_layers, impl=_impl(plan), fp8=False)
    pm = build_model(cfg, seed=9)
    optimizer, scheduler = build_optimizer(pm, cfg, OptimConfig(lr=1e-4, global_batch_size=plan.microbatches))
    teacher = EMATeacher(cfg, pm, seed=9)
    batches = _batches(plan, plan.microbatches, plan.seq, seed=7)
    lm_forward = make_forward_step(partial(lm_objective, cfg=ExitLossConfig()))
    rl_cfg = LoopRPTConfig(num_rollouts=plan.rollouts)
    lm_s = _timed_iterations(plan, lambda: train_step(pm, optimizer, scheduler, batches, lm_forward,
                                                      plan.microbatches))
    rl_s = _timed_iterations(plan, lambda: looprpt_train_step(
        pm, optimizer, scheduler, teacher, batches, rl_cfg, cfg.vocab_size, RolloutConfig(), plan.microbatches, 0.995))
    return {"lm_iteration_s": lm_s, "looprpt_iteration_s": rl_s, "ratio": rl_s / lm_s, "rollouts": plan.rollouts}


# -- running them ------------------------------------------------------------------------------

def _checks(plan: Plan, work_dir: str):
    return [
        ("environment", lambda: check_environment(plan)),
        ("fp8_weight_refresh", lambda: check_fp8_weight_refresh(plan)),
        ("te_vs_local_parity", lambda: check_te_vs_local_parity(plan)),
        ("fusion_parity", lambda: check_fusion_parity(plan)),
        ("grad_accumulation", lambda: check_grad_accumulation(plan)),
        ("local_without_apex", lambda: check_local_without_apex(plan)),
        ("fp8_generation", lambda: check_fp8_generation(plan, work_dir)),
        ("train_bf16", lambda: check_training(plan, fp8=False)),
        ("train_fp8", lambda: check_training(plan, fp8=True)),
        ("looprpt_vs_lm", lambda: check_looprpt_vs_lm(plan)),
    ]


def _free_memory() -> None:
    import torch

    from megatron_looprpt.device import use_cuda

    gc.collect()
    if use_cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib():
    import torch

    from megatron_looprpt.device import use_cuda

    return torch.cuda.max_memory_allocated() / 2**30 if use_cuda() else None


def run_checks(plan: Plan, work_dir: str, budget_s: float, only=None) -> list:
    from megatron_looprpt import parallel

    parallel.initialize(1, 1, seed=1234)
    start, results, blocked = time.perf_counter(), [], None
    for name, check in _checks(plan, work_dir):
        if only and name not in only:
            continue
        result = {"name": name}
        if time.perf_counter() - start > budget_s:
            blocked = f"not started: --budget-s {budget_s:.0f} spent"
        if blocked:
            result.update(status="failed", error=blocked)
            results.append(result)
            continue
        _free_memory()
        began = time.perf_counter()
        try:
            result["figures"] = check()
            result["status"] = "dry-run" if plan.dry_run else "ok"
        except Skip as reason:
            result.update(status="skipped", error=str(reason))
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the next check runs
            result.update(status="failed", error=f"{type(error).__name__}: {error}")
            print(f"gpu_check: {name} FAILED\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        result["seconds"] = time.perf_counter() - began
        result["peak_memory_gib"] = _peak_memory_gib()
        results.append(result)
        if name == "environment" and result["status"] == "failed":
            # the GPU shapes on whatever this is would only take hours to fail
            blocked = "not started: the environment check failed"
        print(f"gpu_check: {name}: {result['status']} ({result['seconds']:.1f} s)", flush=True)
    parallel.destroy()
    return results


def _brief(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(results: list) -> str:
    lines = [f"{'check':<22} {'status':<8} {'s':>6} {'GiB':>6}  figures"]
    for r in results:
        gib = "" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f}"
        figures = r.get("error") or ", ".join(f"{k}={_brief(v)}" for k, v in r.get("figures", {}).items())
        lines.append(f"{r['name']:<22} {r['status']:<8} {r.get('seconds', 0):>6.1f} {gib:>6}  {figures}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu_check.json (created)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: imports, shapes, plumbing")
    p.add_argument("--budget-s", type=float, default=480.0, help="checks not started by then count as failed")
    p.add_argument("--only", nargs="*", default=None, help="run only these checks")
    a = p.parse_args(argv)
    plan = DRY_PLAN if a.dry_run else GPU_PLAN
    if a.dry_run:
        os.environ["LOOPRPT_FORCE_CPU"] = "1"
    names = [name for name, _ in _checks(plan, "")]
    unknown = sorted(set(a.only or ()) - set(names))
    if unknown:
        print(f"gpu_check.py: error: --only {' '.join(unknown)}: choose from {', '.join(names)}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.out) as work_dir:
        results = run_checks(plan, work_dir, a.budget_s, a.only)
    report = {"plan": dataclasses.asdict(plan), "checks": results}
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(table(results))
    failed = [r["name"] for r in results if r["status"] == "failed"]
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
