"""Reductions over a vocabulary split across tensor-parallel ranks.

Logits arrive as [s, b, V/tp] on each rank. These helpers give full-vocabulary answers without
gathering the vocabulary, the way megatron-core's vocab_parallel_cross_entropy does.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.utils import VocabUtility


def label_log_probs(logits: torch.Tensor, labels_sb: torch.Tensor) -> torch.Tensor:
    """log p(label) per position, [s, b], differentiable."""
    return -vocab_parallel_cross_entropy(logits.float(), labels_sb)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the whole vocabulary, [s, b], differentiable."""
    logits = logits.float()
    with torch.no_grad():
        local_max = logits.max(dim=-1, keepdim=True).values
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(
                local_max, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
            )
    shifted = logits - local_max
    exp = shifted.exp()
    partition = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1))
    expected_shifted = reduce_from_tensor_model_parallel_region((exp * shifted).sum(dim=-1))
    return partition.log() - expected_shifted / partition


@torch.no_grad()
def label_log_probs_and_entropy(logits: torch.Tensor, labels_sb: torch.Tensor):
    """(log p(label), entropy), [s, b] each, in one pass over the vocabulary: what the EMA
    teacher and evaluation need, forward only. The two differentiable functions above each
    take their own max, shift and exp over the vocabulary; for a small model's wide head that
    doubles the cost of a teacher pass."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    logits = logits.float()
    shifted_max = logits.max(dim=-1, keepdim=True).values
    if tp > 1:
        dist.all_reduce(shifted_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - shifted_max
    # the label's shifted logit lives on the rank whose vocabulary slice holds it
    start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
        logits.shape[-1], parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0, tp)
    local = (labels_sb >= start) & (labels_sb < end)
    label_shifted = shifted.gather(-1, ((labels_sb - start) * local).unsqueeze(-1)).squeeze(-1) * local
    exp = shifted.exp()
    sums = torch.stack([exp.sum(dim=-1), exp.mul_(shifted).sum(dim=-1), label_shifted])
    if tp > 1:
        dist.all_reduce(sums, group=group)
    partition, expected_shifted, label_shifted = sums
    log_partition = partition.log()
    return label_shifted - log_partition, log_partition - expected_shifted / partition


@torch.no_grad()
def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Index of the largest logit over the whole vocabulary, [s, b] (ties: lowest index)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local_max, local_idx = logits.float().max(dim=-1)
    if tp == 1:
        return local_idx
    rank = parallel_state.get_tensor_model_parallel_rank()
    global_idx = local_idx + rank * logits.shape[-1]
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    idxs = [torch.empty_like(global_idx) for _ in range(tp)]
    group = parallel_state.get_tensor_model_parallel_group()
    dist.all_gather(maxes, local_max, group=group)
    dist.all_gather(idxs, global_idx, group=group)
    # Stable argmax over ranks keeps the lowest vocabulary index on ties, as torch.argmax does.
    best_rank = torch.argmax(torch.stack(maxes), dim=0, keepdim=True)
    return torch.gather(torch.stack(idxs), 0, best_rank).squeeze(0)
