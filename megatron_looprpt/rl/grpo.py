"""GRPO with verifiable rewards, and RLTT, on the sharded looped model.

One step: every data-parallel rank takes its share of the step's prompts and samples G answers
for each (``inference/generation.py``, the last loop step's distribution, one seed per global
(prompt, sample) so that the rollouts do not depend on the layout); a reward function scores
them (``rl/verifier.py`` by default); advantages are the rewards normalised within each prompt's
group of G; prompt + answer sequences become training micro-batches whose loss covers the answer
tokens only; a frozen reference model (an ``EMATeacher`` that is never updated, so sharded like
the student) gives the reference log-probabilities; then ``epochs`` clipped-surrogate updates
with a k3 KL penalty, token-averaged over the global batch by megatron-core's per-token loss.

The log-probability of an answer token is sum_t w_t log P_t(token) over the T loop steps: GRPO
reads the last step only, w = (0, ..., 0, 1); RLTT weights every step, uniformly or
progressively (w_t proportional to t). The ratio is taken to the sampling policy: with one
update per batch it is 1 in value (the surrogate's gradient is A * grad log pi) and the clip
never acts; with several (PPO epochs) the sampling policy's log-probabilities come from one
forward-only pass before the first update, the later updates move the ratio off 1, and
``clip_eps`` bounds how far each token's ratio can pull. All updates of a batch share the
iteration's learning rate: the schedule advances once per batch of rollouts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_looprpt.inference.generation import SamplingConfig, generate
from megatron_looprpt.models.looped_gpt import HeadRequest
from megatron_looprpt.models.step_weights import step_weights
from megatron_looprpt.rl.looprpt_loss import TeacherOutputs, deviations_from_mean
from megatron_looprpt.rl.teacher import forward_outputs
from megatron_looprpt.device import to_device
from megatron_looprpt.schedule import train_step


@dataclass(frozen=True)
class GRPOConfig:
    num_samples: int = 4               # G answers per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.01
    step_weights: str = "last"         # GRPO: "last"; RLTT: "uniform", "progressive" or "w1,...,wT"
    epochs: int = 1                    # optimizer steps on each batch of rollouts
    seed: int = 1234

    def check(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (advantages are relative to the group), got {self.num_samples}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def weights(self, loop_steps: int) -> torch.Tensor:
        return torch.tensor(step_weights(self.step_weights, loop_steps))


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rewards [P, G] -> advantages [P, G]: (r - group mean) / (group std + eps)."""
    std = rewards.std(dim=-1, unbiased=False, keepdim=True)
    return deviations_from_mean(rewards, -1) / (std + eps)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, kl_coef: float):
    """Per-token clipped surrogate and k3 KL(pi || ref) ([b, s] each, advantages [b]); returns
    (loss summed over masked tokens, {"pg": sum, "kl": sum, "clipped": tokens whose ratio lies
    outside [1 - clip_eps, 1 + clip_eps]})."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    mask = mask.to(logp.dtype)
    pg = (-surrogate * mask).sum()
    kl_sum = (kl * mask).sum()
    clipped = (((ratio - 1).abs() > clip_eps).to(mask.dtype) * mask).sum()
    return pg + kl_coef * kl_sum, {"pg": pg.detach(), "kl": kl_sum.detach(), "clipped": clipped.detach()}


def weighted_logp(step_logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t log P_t: per-step log-probs [T, b, s] -> [b, s]."""
    return torch.einsum("t,tbs->bs", weights.to(step_logp), step_logp)


def grpo_objective(batch, reference: TeacherOutputs, old: Optional[TeacherOutputs], cfg: GRPOConfig, output):
    """The loss of one micro-batch; ``old``: the sampling policy's outputs (None: the policy has
    not moved since sampling, the first update)."""
    step_logp = output.stack("label_logprobs")                            # [T, b, s]
    weights = cfg.weights(step_logp.shape[0])
    logp = weighted_logp(step_logp, weights)
    ref_logp = weighted_logp(reference.logp.to(step_logp), weights)
    old_logp = logp.detach() if old is None else weighted_logp(old.logp.to(step_logp), weights)
    mask = batch["loss_mask"]
    loss, terms = grpo_token_loss(logp, old_logp, ref_logp, batch["advantages"], mask,
                                  cfg.clip_eps, cfg.kl_coef)
    metrics = {"grpo_reward": batch["rewards"].sum(), "grpo_sequences": torch.tensor(float(mask.shape[0])),
               "grpo_answer_tokens": mask.sum(), "grpo_pg_loss": terms["pg"], "grpo_kl": terms["kl"],
               "grpo_clipped": terms["clipped"]}
    return loss, mask.sum().to(torch.int), metrics


def _forward_step(references: List[TeacherOutputs], olds: Optional[List[TeacherOutputs]], cfg: GRPOConfig):
    """One update's forward_step: the schedule calls it once per micro-batch, in order."""
    head = HeadRequest(label_logprobs=True)
    pending = deque(zip(references, olds if olds is not None else [None] * len(references)))

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], head=head)
        return output, lambda out: grpo_objective(batch, *pending.popleft(), cfg, out)

    return forward_step


def training_batches(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                     advantages: torch.Tensor, rewards: torch.Tensor, seq_length: int,
                     micro_batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Prompt + answer sequences as next-token micro-batches of ``seq_length``; the loss mask
    covers the positions whose label is an answer token."""
    rows = len(prompts)
    if rows % micro_batch_size:
        raise ValueError(f"{rows} sequences do not split into micro-batches of {micro_batch_size}")
    tokens = torch.zeros(rows, seq_length, dtype=torch.long)
    labels = torch.zeros(rows, seq_length, dtype=torch.long)
    mask = torch.zeros(rows, seq_length)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        sequence = list(prompt) + list(answer)
        if len(sequence) - 1 > seq_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus its answer of {len(answer)} exceeds "
                             f"--seq-length {seq_length}")
        tokens[row, :len(sequence) - 1] = torch.tensor(sequence[:-1])
        labels[row, :len(sequence) - 1] = torch.tensor(sequence[1:])
        mask[row, len(prompt) - 1:len(sequence) - 1] = 1.0
    positions = torch.arange(seq_length).expand(micro_batch_size, -1)
    return [{"tokens": tokens[i:i + micro_batch_size], "labels": labels[i:i + micro_batch_size],
             "loss_mask": mask[i:i + micro_batch_size], "position_ids": positions,
             "advantages": advantages[i:i + micro_batch_size], "rewards": rewards[i:i + micro_batch_size]}
            for i in range(0, rows, micro_batch_size)]


def grpo_train_step(pm, optimizer, scheduler, reference, problems: Sequence, first_index: int, tokenizer,
                    vocab_size: int, cfg: GRPOConfig, seq_length: int, micro_batch_size: int,
                    global_batch_size: int, reward_fn: Optional[Callable[[str, object], float]] = None):
    """One GRPO / RLTT step on this data-parallel rank's ``problems`` (the first has global index
    ``first_index``); a problem gives ``prompt_tokens(tokenizer)``, ``answer_text(tokenizer,
    tokens)`` and ``reward(text)`` (data/prompts.py, rl/rpt.py). ``global_batch_size`` counts
    sequences (prompts x G) over all ranks. ``reward_fn(answer_text, problem)`` replaces the
    problem's reward. Returns reduced metric sums (see grpo_record)."""
    cfg.check()
    cfg.weights(pm.model.loop_steps)  # refuse bad weights before sampling
    reward_fn = reward_fn or (lambda text, problem: problem.reward(text))
    # a prompt keeps its last tokens so that prompt + answer fit in seq_length
    prompts = [list(p.prompt_tokens(tokenizer))[-(seq_length - cfg.max_new_tokens):] for p in problems]
    rows = [prompt for prompt in prompts for _ in range(cfg.num_samples)]
    seeds = [cfg.seed * 1_000_003 + (first_index + i) * cfg.num_samples + g
             for i in range(len(prompts)) for g in range(cfg.num_samples)]
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p, stop_tokens=(tokenizer.eod,))
    answers = generate(pm, rows, vocab_size, sampling, row_seeds=seeds).tokens
    groups = [problems[row // cfg.num_samples] for row in range(len(answers))]
    rewards = score_answers(groups, answers, tokenizer, sampling.stop_tokens, reward_fn)
    advantages = group_advantages(rewards.view(-1, cfg.num_samples)).flatten()
    # on the device once: the reference pass, the sampling policy's pass and every update read them
    batches = [to_device(batch) for batch in
               training_batches(rows, answers, advantages, rewards, seq_length, micro_batch_size)]
    references = list(reference.run(batches))
    # the sampling policy's log-probs, needed once the first update has moved the policy
    olds = list(forward_outputs(pm, batches)) if cfg.epochs > 1 else None
    totals: Dict[str, torch.Tensor] = {}
    for epoch in range(cfg.epochs):
        last = epoch == cfg.epochs - 1
        metrics = train_step(pm, optimizer, scheduler, batches,
                             _forward_step(references, olds if epoch else None, cfg), global_batch_size,
                             step_scheduler=last)
        for name, value in metrics.items():
            # loss terms add up over the updates (grpo_record divides by the summed counts);
            # the grad norm and learning rate are the last update's
            totals[name] = value if name in ("grad_norm", "lr") or name not in totals else totals[name] + value
    return totals


def score_answers(problems: Sequence, answers: Sequence[Sequence[int]], tokenizer, stop_tokens: Sequence[int],
                  reward_fn: Callable[[str, object], float]) -> torch.Tensor:
    """Each answer's reward, judged on its text without the stop token that ended it (a Hugging
    Face tokenizer decodes "<|endoftext|>" as text, which would spoil a final "Answer: 12")."""
    stops = set(stop_tokens)
    texts = [problem.answer_text(tokenizer, answer[:-1] if answer and answer[-1] in stops else answer)
             for problem, answer in zip(problems, answers)]
    return torch.tensor([reward_fn(text, problem) for text, problem in zip(texts, problems)], dtype=torch.float32)


def grpo_record(metrics: Dict[str, torch.Tensor]) -> dict:
    sequences = max(metrics["grpo_sequences"].item(), 1.0)
    tokens = max(metrics["grpo_answer_tokens"].item(), 1.0)
    return {"reward_mean": metrics["grpo_reward"].item() / sequences,
            "answer_length": tokens / sequences,
            "pg_loss": metrics["grpo_pg_loss"].item() / tokens,
            "kl": metrics["grpo_kl"].item() / tokens,
            "clip_fraction": metrics["grpo_clipped"].item() / tokens,
            "grad_norm": metrics["grad_norm"].item()}
