"""The state of a GRPO / RLTT / RPT run (``--rl-algo grpo|rltt|rpt``): the frozen reference
model, the prompts (problems, or for RPT corpus sequences), and which of them each step and
data-parallel rank takes."""

from __future__ import annotations

import time

import torch
from megatron.core import parallel_state

from megatron_looprpt.data.datasets import build_datasets
from megatron_looprpt.data.prompts import generate_problems, read_problems
from megatron_looprpt.models.builder import LoopedModelConfig
from megatron_looprpt.rl.grpo import GRPOConfig, grpo_record, grpo_train_step
from megatron_looprpt.rl.rpt import DEFAULT_INSTRUCTION, RPTConfig, rpt_train_step
from megatron_looprpt.rl.teacher import EMATeacher
from megatron_looprpt.rl.verifier import reward_function


class TokenRLRun:
    def __init__(self, args, cfg: LoopedModelConfig, pm, tokenizer, vocab_size: int):
        self.args, self.pm, self.tokenizer, self.vocab_size = args, pm, tokenizer, vocab_size
        # frozen: an EMA teacher that is never updated, sharded like the student
        self.reference = EMATeacher(cfg, pm, seed=args.seed)
        if args.rl_algo == "rpt":
            # one corpus sequence per prompt, drawn in order from the training split
            prompts_total = args.train_iters * args.global_batch_size // args.grpo_num_samples
            self.sequences, _, _ = build_datasets(args.data_path, args.split, args.seq_length, args.seed,
                                                  tokenizer, num_samples=(prompts_total, 1, 1),
                                                  mock=args.mock_data)
            instruction = DEFAULT_INSTRUCTION if args.rpt_instruction is None else args.rpt_instruction
            self.rpt = RPTConfig(horizon=args.rpt_horizon, min_context=args.rpt_min_context, instruction=instruction)
        else:
            self.problems = (read_problems(args.prompt_data) if args.prompt_data
                             else generate_problems(args.num_generated_prompts, seed=args.seed))
            self.verify = reward_function(args.answer_verifier)
        self.cfg = GRPOConfig(
            num_samples=args.grpo_num_samples, max_new_tokens=args.max_new_tokens,
            temperature=args.sampling_temperature, top_p=args.sampling_top_p,
            clip_eps=args.grpo_clip_eps, kl_coef=args.grpo_kl_coef, epochs=args.grpo_epochs,
            step_weights=(args.rltt_weights or "uniform") if args.rl_algo == "rltt" else "last", seed=args.seed,
        )

    def step(self, optimizer, scheduler, consumed_samples: int) -> dict:
        """One step on this rank's prompts (the prompt order cycles through the set); returns
        the log record's fields."""
        args = self.args
        dp = parallel_state.get_data_parallel_world_size()
        per_rank = args.global_batch_size // self.cfg.num_samples // dp
        first = consumed_samples // self.cfg.num_samples + parallel_state.get_data_parallel_rank() * per_rank
        start = time.time()
        if args.rl_algo == "rpt":
            sequences = [self._sequence((first + i) % len(self.sequences)) for i in range(per_rank)]
            metrics = rpt_train_step(self.pm, optimizer, scheduler, self.reference, sequences, first,
                                     self.tokenizer, self.vocab_size, self.cfg, self.rpt, args.seq_length,
                                     args.micro_batch_size, args.global_batch_size)
        else:
            problems = [self.problems[(first + i) % len(self.problems)] for i in range(per_rank)]
            metrics = grpo_train_step(self.pm, optimizer, scheduler, self.reference, problems, first,
                                      self.tokenizer, self.vocab_size, self.cfg, args.seq_length,
                                      args.micro_batch_size, args.global_batch_size,
                                      reward_fn=lambda text, problem: self.verify(text, problem.answer))
        return {**grpo_record(metrics), "lr": metrics["lr"].item(), "elapsed_s": time.time() - start}

    def _sequence(self, index: int) -> dict:
        item = self.sequences[index]
        return {name: torch.as_tensor(item[name]) for name in ("tokens", "labels", "loss_mask", "position_ids")}
