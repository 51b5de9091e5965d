"""Every flag of pretrain_looprpt.py: its name (Megatron-LM's), group, default and help.

The checks and derived values are ``megatron_looprpt.arguments``'; docs/configuration.md is
generated from this parser (tools/config_reference.py). Only the standard library is imported.
"""

from __future__ import annotations

import argparse

from megatron_looprpt.presets import PRESETS

# The vocabulary of a --mock-data run that names no tokenizer.
MOCK_VOCAB_SIZE = 4096
# The Transformer Engine version each FP8 recipe needs: megatron-core builds the recipe only
# from these versions on (fp8_utils.get_fp8_recipe).
FP8_RECIPE_MIN_TE = {"delayed": (0,), "tensorwise": (2, 2), "blockwise": (2, 3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_looprpt.py",
        description="Pre-train looped language models (Ouro) and run LoopRPT on megatron-core. "
                    "Without arguments: the CPU quickstart.",
    )
    # Shape flags default to None so that a preset fills only what the user did not give.
    g = p.add_argument_group("model")
    g.add_argument("--model-size", choices=sorted(PRESETS), default=None,
                   help="preset shape; explicit shape flags override it (default: tiny when no "
                        "architecture flag is given)")
    g.add_argument("--num-layers", type=int, default=None, help="layers in the shared block (N)")
    g.add_argument("--hidden-size", type=int, default=None, help="model width h")
    g.add_argument("--num-attention-heads", type=int, default=None, help="attention heads")
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA groups (default: heads)")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="SwiGLU width (default: 4*hidden)")
    g.add_argument("--seq-length", type=int, default=None, help="training sequence length")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="longest sequence RoPE is set up for (default: --seq-length)")
    g.add_argument("--rotary-base", type=int, default=None, help="RoPE theta (default 10000; Ouro: 1000000)")
    g.add_argument("--norm-epsilon", type=float, default=1e-6, help="RMSNorm epsilon")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="separate input embedding and output layer (the default, as Ouro)")
    g.add_argument("--tie-embeddings-and-output-weights", dest="untie_embeddings_and_output_weights",
                   action="store_false", default=None,
                   help="share the input embedding and the output layer")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="std of the normal init (output projections scaled by 1/sqrt(2 N T))")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on attention probabilities")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="dropout on the residual branches")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="default: transformer_engine when installed, else local")

    g = p.add_argument_group("loop")
    g.add_argument("--loop-steps", type=int, default=None, help="T: applications of the shared block (default 4)")
    g.add_argument("--exit-entropy-coef", type=float, default=0.05, help="beta of Ouro's stage-1 loss")
    g.add_argument("--exit-threshold", type=float, default=0.9, help="q of Q-exit")
    g.add_argument("--exit-gate-training", choices=["stage1", "stage2"], default="stage1",
                   help="stage2: Ouro's gate-only training from per-step loss improvements")
    g.add_argument("--exit-gate-init", choices=["geometric", "uniform"], default="geometric",
                   help="the exit distribution a new gate starts from: geometric = Ouro's shared gate with "
                        "zero bias (1/2, 1/4, ...); uniform = plus a learned per-step bias starting it at 1/T "
                        "(such a checkpoint cannot be exported to Hugging Face Ouro)")
    g.add_argument("--loop-step-embedding", action="store_true",
                   help="add a learned vector per loop step to the shared block's input, so that the block can "
                        "tell its steps apart (Universal Transformer's timestep signal; Ouro has none: such a "
                        "checkpoint cannot be exported to Hugging Face Ouro; docs/model.md)")
    g.add_argument("--loop-input-injection", action="store_true", default=None,
                   help="every loop step after the first also reads the token embedding, scaled to unit RMS "
                        "(input injection; Ouro has none: such a checkpoint cannot be exported to Hugging Face "
                        "Ouro). Default: on for the presets tiny to base (the stage-1 recipe, docs/depth.md), "
                        "off for the ouro-* presets and shapes given by hand")
    g.add_argument("--no-loop-input-injection", dest="loop_input_injection", action="store_false", default=None,
                   help="Ouro's loop: each step reads only the previous step's output")
    g.add_argument("--loop-carry", choices=["normed", "residual"], default="normed",
                   help="what the next loop step consumes: normed = the final norm's output (Ouro); residual = "
                        "the un-normalised residual stream, as an unshared stack would (not exportable to Ouro)")
    g.add_argument("--step-loss-weights", default="last:0.85",
                   metavar="{exit,uniform,progressive,last,last:F,w1,...,wT}",
                   help="stage 1: how the backbone's per-step losses are weighted: last:F = the last step F, the "
                        "others (1 - F) / (T - 1) each (last:0.85, the default: docs/depth.md); uniform = 1/T each; "
                        "exit = by the gate's exit distribution (Ouro's exact loss); progressive = t / sum(t); "
                        "last = the last step only; or T comma-separated non-negative numbers (normalised to "
                        "sum 1); for all but exit the gate learns Ouro's exit objective on the detached losses")
    g.add_argument("--step-increase-penalty", type=float, default=0.0, metavar="LAMBDA",
                   help="stage 1: add LAMBDA * max(0, CE_{t+1} - sg[CE_t]) per token and loop step, so that a "
                        "step is trained harder where it is worse than the step before (not Ouro's; "
                        "docs/depth.md)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch per data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    g.add_argument("--train-iters", type=int, default=100, help="optimizer steps to train (counting resumed ones)")
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of weights, data order and LoopRPT noise (the same model under every layout)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and activations, fp32 master weights and grad reduction")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="FP8 GEMMs via Transformer Engine (needs --bf16 and --transformer-impl transformer_engine)")
    g.add_argument("--fp8-recipe", choices=list(FP8_RECIPE_MIN_TE), default=None,
                   help="megatron-core's FP8 scaling recipe (default delayed; tensorwise needs TE >= 2.2, "
                        "blockwise TE >= 2.3)")
    g.add_argument("--fp8-margin", type=int, default=None, help="delayed scaling: scale margin (default 0)")
    g.add_argument("--fp8-amax-history-len", type=int, default=None,
                   help="delayed scaling: amax history length (default 1024)")
    g.add_argument("--fp8-amax-compute-algo", choices=["max", "most_recent"], default=None,
                   help="delayed scaling: amax from the history's max or its most recent entry (default max)")
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false",
                   help="unfused attention softmax (local layers; fused only where apex's kernels are installed)")
    g.add_argument("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion", action="store_false",
                   help="unfused SwiGLU (fused on GPU by default)")
    g.add_argument("--no-rope-fusion", dest="apply_rope_fusion", action="store_false",
                   help="unfused RoPE (fused on GPU when Transformer Engine is installed)")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false",
                   help="weight gradients through autograd instead of straight into the fp32 main grads "
                        "(fused on GPU with Transformer Engine layers, or apex)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup iterations")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine",
                   help="decay after warmup")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip")

    g = p.add_argument_group("parallel")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP size: stages split the looped block's layers; the loop goes around the ring T times")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard activations along the sequence over TP ranks (needs TP > 1)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state (and fp32 master weights) over data-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=None,
                   help="reduce each gradient bucket during the backward pass, as soon as it is complete (default: "
                        "on, except token-level RL (--rl-algo grpo|rltt|rpt), whose loss never reaches the exit gate)")
    g.add_argument("--overlap-param-gather", action=argparse.BooleanOptionalAction, default=None,
                   help="with --use-distributed-optimizer: all-gather the updated weights during the next "
                        "forward pass (default: on with the distributed optimizer, except --rl-algo looprpt)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient bucket (default: megatron-core's, max(4e7, 1e6 x DP))")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="prefix, prefixes, or a blend: w1 prefix1 w2 prefix2 ...")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of the documents")
    g.add_argument("--mock-data", action="store_true",
                   help="synthetic data (megatron's MockGPTDataset) instead of --data-path")
    g.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"],
                   default=None,
                   help="default: SentencePieceTokenizer; with --mock-data and no tokenizer flags, "
                        f"NullTokenizer with --vocab-size {MOCK_VOCAB_SIZE}")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or tokenizer.json")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer vocabulary; with a real tokenizer, the model vocabulary when larger "
                        "than the tokenizer's (a converted checkpoint's; adopted from --load when not given)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP (Megatron's rule)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data-loader worker processes per rank (default: 2 on a GPU, 0 on the CPU)")

    g = p.add_argument_group("checkpoint")
    g.add_argument("--save", default=None, help="checkpoint directory to write (atomically: temp name, then rename)")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from (any TP/PP layout)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="iterations between checkpoints (a final one is always written)")
    g.add_argument("--ckpt-keep", type=int, default=None, help="keep the newest N checkpoints (default: all)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background process while training continues "
                        "(megatron-core's async save; published atomically once complete)")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="fail when --load has no checkpoint instead of starting from scratch")
    g.add_argument("--no-load-optim", action="store_true", help="do not restore optimizer and scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG state")
    g.add_argument("--finetune", action="store_true", help="load weights only, restart iteration count")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10, help="iterations between console lines")
    g.add_argument("--eval-interval", type=int, default=0, help="iterations between validation passes (0: none)")
    g.add_argument("--eval-iters", type=int, default=10, help="global batches per validation pass")
    g.add_argument("--log-json", default=None, help="one JSON object per iteration")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard event directory (when tensorboard is installed)")
    g.add_argument("--wandb-project", default=None, help="wandb project (offline unless WANDB_MODE says otherwise)")
    g.add_argument("--wandb-exp-name", default=None, help="wandb run name")
    g.add_argument("--wandb-save-dir", default=None, help="wandb directory")
    g.add_argument("--no-progress-bar", action="store_true", help="no progress bar even on a terminal")

    g = p.add_argument_group("rl")
    g.add_argument("--rl-algo", choices=["none", "looprpt", "grpo", "rltt", "rpt"], default="none",
                   help="looprpt: reinforcement pre-training on the loop steps; grpo / rltt: token-level RL "
                        "with verifiable rewards on --prompt-data; rpt: next-token reasoning on --data-path; "
                        "none: plain pre-training")
    g.add_argument("--rl-hard-token-ratio", type=float, default=0.2,
                   help="fraction of each sequence's tokens (highest teacher entropy) the RL terms use")
    g.add_argument("--rl-num-rollouts", type=int, default=8, help="G noisy latent rollouts per token")
    g.add_argument("--rl-reference-threshold", type=float, default=0.5,
                   help="CDF level of the teacher's exit distribution that defines the reference step t_ref "
                        "(the authors' gate threshold; --exit-threshold is Q-exit's)")
    g.add_argument("--rl-pg-rollout-reduction", choices=["sum", "mean"], default="sum",
                   help="how the policy loss combines the G rollouts of a token (sum: the authors' "
                        "per-step-noise trainer; mean: the one their launch script runs)")
    g.add_argument("--rl-pg-gate-only", action="store_true",
                   help="the policy gradient trains the exit gate only (rollouts see detached latents); "
                        "by default it also flows through the noisy latents into the backbone")
    g.add_argument("--rl-latent-noise-std", type=float, default=0.1,
                   help="std of the Gaussian latent noise (drop probability for dropout)")
    g.add_argument("--rl-noise-type", choices=["gaussian", "dropout"], default="gaussian",
                   help="how latents are perturbed")
    g.add_argument("--rl-reward-scale", type=float, default=1.0, help="multiplies the step-wise reward")
    g.add_argument("--rl-time-penalty", type=float, default=0.02, help="lam_base (the authors' default)")
    g.add_argument("--rl-time-penalty-scale", type=float, default=0.5, help="lam_scale (the authors' default)")
    g.add_argument("--rl-ema-decay", type=float, default=0.995,
                   help="teacher = decay * teacher + (1 - decay) * student after each step")
    g.add_argument("--rl-pg-coef", type=float, default=1.0, help="weight of the policy-gradient term")
    g.add_argument("--rl-model-coef", type=float, default=1.0, help="weight of the advantage-weighted backbone CE")
    g.add_argument("--rl-entropy-coef", type=float, default=0.01, help="weight of the exit-distribution entropy bonus")
    g.add_argument("--rl-kl-coef", type=float, default=0.001, help="weight of the k3 KL to the teacher")

    g = p.add_argument_group("token-level rl (grpo, rltt, rpt)")
    g.add_argument("--prompt-data", default=None,
                   help='JSONL of {"problem", "answer"} (default: a generated arithmetic/word-problem set)')
    g.add_argument("--num-generated-prompts", type=int, default=10000,
                   help="size of the generated default prompt set")
    g.add_argument("--grpo-num-samples", type=int, default=4,
                   help="G answers per prompt; --global-batch-size counts answers (prompts x G)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="longest sampled answer")
    g.add_argument("--sampling-temperature", type=float, default=1.0, help="temperature of the rollouts")
    g.add_argument("--sampling-top-p", type=float, default=1.0, help="nucleus of the rollouts")
    g.add_argument("--grpo-clip-eps", type=float, default=0.2,
                   help="ratio clip of the surrogate (acts from the second of --grpo-epochs updates on)")
    g.add_argument("--grpo-epochs", type=int, default=1,
                   help="optimizer steps on each batch of rollouts (PPO epochs), at the iteration's learning rate")
    g.add_argument("--grpo-kl-coef", type=float, default=0.01, help="weight of the k3 KL to the frozen reference")
    g.add_argument("--answer-verifier", choices=["builtin", "math-verify"], default="builtin",
                   help="grpo / rltt: how a final answer is judged: builtin (dependency-free) or Hugging Face's "
                        "math-verify (pip install -e .[rl])")
    g.add_argument("--rltt-weights", default=None,
                   help="RLTT's loop-step weights of the log-probability: uniform (default), progressive or w1,...,wT")
    g.add_argument("--rpt-horizon", type=int, default=4,
                   help="RPT: tokens of true continuation a predicted next text is judged against")
    g.add_argument("--rpt-min-context", type=int, default=16, help="RPT: tokens of context before a chosen position")
    g.add_argument("--rpt-instruction", default=None,
                   help="RPT: text after the context asking for the prediction (default: reason, then give the "
                        "next words in \\boxed{}; '' for the bare text)")
    return p
