"""RPT, reinforcement pre-training (arXiv 2506.08007): next-token reasoning on plain text.

At the hard positions of corpus sequences (the highest next-token entropy of a proxy model, here
the frozen reference: the policy RPT starts from) the model is prompted with the text so far,
followed by an instruction to reason and then give the next words in ``\\boxed{}`` (as the RPT
paper prompts its reasoning model; an empty instruction leaves the bare text), and samples an
answer: optional reasoning, then its predicted continuation, the content of its last
``\\boxed{...}``, or the text after its last ``</think>`` (less the line breaks that open it),
or else the whole answer. The reward is 1 when the prediction is a non-empty byte-level prefix of
the true continuation that ends on one of the true continuation's token boundaries, else 0: the
leading space of " on" is part of what is predicted. The update is GRPO's (``rl/grpo.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_looprpt.device import to_device
from megatron_looprpt.rl.grpo import GRPOConfig, grpo_train_step
from megatron_looprpt.rl.verifier import last_boxed


DEFAULT_INSTRUCTION = ("\n\n(Predict the words that come next in the text above. Think it over, then "
                       "write them inside \\boxed{}.)\n")


@dataclass(frozen=True)
class NextTokenProblem:
    context: Tuple[int, ...]          # the tokens so far
    continuation: str                 # the true text after them (a few tokens' worth)
    boundaries: Tuple[int, ...]       # byte lengths of the continuation at its token boundaries
    instruction: Tuple[int, ...] = () # tokens asking for the prediction, after the context

    def prompt_tokens(self, tokenizer) -> List[int]:
        return list(self.context) + list(self.instruction)

    def answer_text(self, tokenizer, tokens: Sequence[int]) -> str:
        # decoded after the prompt: tokenizers that drop a leading space decode alone otherwise
        return _decoded_after(tokenizer, self.prompt_tokens(tokenizer), tokens)

    def reward(self, text: str) -> float:
        return rpt_reward(prediction_of(text), self)


def _decoded_after(tokenizer, context: Sequence[int], tokens: Sequence[int]) -> str:
    before = tokenizer.detokenize(list(context))
    whole = tokenizer.detokenize(list(context) + list(tokens))
    return whole[len(before):] if whole.startswith(before) else tokenizer.detokenize(list(tokens))


def prediction_of(answer: str) -> str:
    """The predicted continuation in an answer (see the module docstring)."""
    if "\\boxed{" in answer:
        return last_boxed(answer) or ""
    if "</think>" in answer:
        return answer.rsplit("</think>", 1)[1].lstrip("\r\n")
    return answer


def rpt_reward(prediction: str, problem: NextTokenProblem) -> float:
    predicted = prediction.encode("utf-8")
    truth = problem.continuation.encode("utf-8")
    ok = bool(predicted) and truth.startswith(predicted) and len(predicted) in problem.boundaries
    return 1.0 if ok else 0.0


def next_token_problem(tokenizer, tokens: Sequence[int], position: int, horizon: int,
                       instruction: str = "") -> NextTokenProblem:
    """The problem at ``position``: predict what follows tokens[:position + 1], judged against
    the next ``horizon`` tokens."""
    context = tuple(int(t) for t in tokens[:position + 1])
    following = [int(t) for t in tokens[position + 1:position + 1 + horizon]]
    pieces = [_decoded_after(tokenizer, context, following[:k]) for k in range(1, len(following) + 1)]
    boundaries = tuple(len(p.encode("utf-8")) for p in pieces)
    asked = tuple(tokenizer.tokenize(instruction)) if instruction else ()
    return NextTokenProblem(context, pieces[-1] if pieces else "", boundaries, asked)


def hardest_positions(entropy: torch.Tensor, loss_mask: torch.Tensor, min_context: int, horizon: int) -> List[int]:
    """Per sequence ([b, s] entropy of the proxy's next-token distribution; position p predicts
    label p), the position with the highest entropy among those with at least ``min_context``
    tokens before and ``horizon`` valid labels from it on (the continuation it is judged on). A
    sequence without such a position (loss-masked throughout) is judged where the mask would
    otherwise have allowed, so one odd sequence does not stop a run."""
    s = entropy.shape[1]
    if s - horizon <= min_context:
        raise ValueError(f"sequences of {s} tokens leave no position with {min_context} tokens of context "
                         f"and {horizon} to predict")
    window = torch.zeros_like(loss_mask, dtype=torch.bool)
    window[:, min_context:s - horizon + 1] = True
    # valid[p]: labels p .. p + horizon - 1 all count
    covered = loss_mask.bool().unfold(1, horizon, 1).all(dim=-1)          # [b, s - horizon + 1]
    valid = window.clone()
    valid[:, :covered.shape[1]] &= covered
    valid[:, covered.shape[1]:] = False
    valid = torch.where(valid.any(dim=1, keepdim=True), valid, window)
    return entropy.masked_fill(~valid, float("-inf")).argmax(dim=1).tolist()


@dataclass(frozen=True)
class RPTConfig:
    horizon: int = 4           # tokens of true continuation a prediction is judged against
    min_context: int = 16      # tokens before a chosen position
    instruction: str = DEFAULT_INSTRUCTION   # appended to the context; "" for the bare text


def rpt_train_step(pm, optimizer, scheduler, reference, sequences: List[dict], first_index: int, tokenizer,
                   vocab_size: int, cfg: GRPOConfig, rpt: RPTConfig, seq_length: int, micro_batch_size: int,
                   global_batch_size: int, reward_fn=None):
    """One RPT step on this rank's corpus ``sequences`` (dicts with tokens, labels, loss_mask,
    position_ids [s]; the first has global index ``first_index``): the reference model's entropy
    picks one hard position per sequence, then GRPO on predicting what follows it.
    ``reward_fn(answer_text, problem)`` replaces the RPT reward (tests)."""
    proxy_batches = [to_device({name: sequence[name].unsqueeze(0) for name in ("tokens", "labels", "loss_mask",
                                                                              "position_ids")})
                     for sequence in sequences]
    # the pipeline schedule runs a multiple of PP micro-batches: pad with copies of the first
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    proxy_batches += proxy_batches[:1] * (-len(proxy_batches) % pp)
    proxy = list(reference.run(proxy_batches))[:len(sequences)]   # filled on the last pipeline stage only
    positions = torch.zeros(len(sequences), dtype=torch.long)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        entropy = torch.cat([out.entropy[-1] for out in proxy]).cpu()   # [b, s], the last loop step
        loss_mask = torch.stack([s["loss_mask"] for s in sequences])
        positions = torch.tensor(hardest_positions(entropy, loss_mask, rpt.min_context, rpt.horizon))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        device = next(pm.model.parameters()).device
        positions = positions.to(device)
        dist.broadcast(positions, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    positions = positions.cpu().tolist()
    problems = [next_token_problem(tokenizer, seq["tokens"].tolist() + [int(seq["labels"][-1])], pos, rpt.horizon,
                                   rpt.instruction)
                for seq, pos in zip(sequences, positions)]
    return grpo_train_step(pm, optimizer, scheduler, reference, problems, first_index, tokenizer, vocab_size,
                           cfg, seq_length, micro_batch_size, global_batch_size, reward_fn)
