"""Batched sampling from the looped model with a KV cache for every loop step.

Ouro keeps one KV cache per loop iteration: at step t a layer attends over the keys and values
it produced at step t for the earlier positions. megatron-core keys its cache by layer number,
and the looped block reuses its layers (and so their numbers) at every step, so each loop step
gets its own megatron ``StaticInferenceContext`` (``LoopKVCache``) and the model hands step t's
context to the block at step t.

Prompts of different lengths are generated as Megatron-LM does with a static cache: the shortest
prompt's length is processed at once (prefill), then one position at a time for the whole batch,
where a row still inside its prompt keeps its prompt token instead of the sampled one. Every
tensor-parallel rank computes the full (gathered) logits and samples with the same seeded CPU
generators (one per row), so all ranks agree on every token without communication. The
sampling maths runs where the logits are; only each row's uniform goes to the device and only
its pick (token, log-probability, exit step) comes back, not the [b, V] logits. Under pipeline parallelism
each pass runs through megatron-core's (interleaved) schedule, forward only, with the rows split
into PP micro-batches; the last stage samples and broadcasts the tokens to the other stages. The next token is read from
the logits of one loop step (``exit_step``, default the last), or per token by Q-exit at
``exit_threshold`` as Ouro's ``early_exit_threshold`` does; every step runs regardless, since
later positions attend to every step's cache. A model trained with FP8 decodes with bf16 GEMMs:
Transformer Engine's FP8 GEMMs need token counts in multiples of 8/16, and decoding has b.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_looprpt.models.exit_gate import exit_distribution, q_exit_steps
from megatron_looprpt.models.looped_gpt import HeadRequest


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0              # 0: greedy
    top_p: float = 1.0
    stop_tokens: tuple = ()
    seed: int = 0
    exit_step: Optional[int] = None       # 0-based loop step whose logits are sampled; None: the last
    exit_threshold: Optional[float] = None  # Q-exit per token instead of a fixed step
    use_cache: bool = True                # False: recompute the whole prefix for every token

    def check(self, loop_steps: int) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.exit_step is not None and not 0 <= self.exit_step < loop_steps:
            raise ValueError(f"exit_step must be in [0, {loop_steps - 1}], got {self.exit_step}")
        if self.exit_step is not None and self.exit_threshold is not None:
            raise ValueError("give exit_step or exit_threshold, not both")


@dataclass
class GenerationOutput:
    tokens: List[List[int]] = field(default_factory=list)     # generated tokens of each prompt
    logprobs: List[List[float]] = field(default_factory=list)  # their log-probabilities as sampled
    exit_steps: List[List[int]] = field(default_factory=list)  # 1-based loop step each was read from


class LoopKVCache:
    """One megatron-core static KV cache per loop step, advanced together."""

    def __init__(self, loop_steps: int, max_batch_size: int, max_sequence_length: int):
        self.steps = [StaticInferenceContext(max_batch_size, max_sequence_length) for _ in range(loop_steps)]

    @property
    def offset(self) -> int:
        return self.steps[0].sequence_len_offset

    def advance(self, num_positions: int) -> None:
        for context in self.steps:
            context.sequence_len_offset += num_positions


def _full_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel logits [..., V/tp] -> the whole vocabulary in fp32, padding rows masked."""
    full = gather_from_tensor_model_parallel_region(logits).float()
    full[..., vocab_size:] = float("-inf")
    return full


def sample(logits: torch.Tensor, cfg: SamplingConfig, generators: Sequence[torch.Generator],
           drawing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next tokens [b] (on the logits' device) from logits [b, V] (temperature, then nucleus).
    Row r draws one uniform from its own CPU generator, and only where ``drawing[r]`` (default:
    every row): a row still inside its prompt draws nothing, so its samples do not depend on the
    rows batched with it (their prompt lengths, the pipeline's padding)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    cdf = probs.cumsum(dim=-1)
    drawing = torch.ones(len(generators), dtype=torch.bool) if drawing is None else drawing
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) if draw else
                            torch.tensor(0.5, dtype=torch.float64) for g, draw in zip(generators, drawing.tolist())])
    uniforms = uniforms.to(cdf.device)
    # the first token whose CDF exceeds u * total: never one of zero probability
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return picked.clamp(max=logits.shape[-1] - 1)


class _Reader:
    """Which loop step's logits give the next token."""

    def __init__(self, loop_steps: int, cfg: SamplingConfig):
        self.cfg = cfg
        self.step = loop_steps - 1 if cfg.exit_step is None else cfg.exit_step
        vocab_steps = None if cfg.exit_threshold is not None else (self.step,)
        self.head = HeadRequest(label_logprobs=False, logits=True, recompute=False, vocab_steps=vocab_steps)

    def last_position(self, output, vocab_size: int):
        """(full logits [b, V], 1-based exit step [b]) at the chunk's last position."""
        if self.cfg.exit_threshold is None:
            logits = _full_logits(output.steps[self.step].logits[:, -1], vocab_size)
            return logits, torch.full((logits.shape[0],), self.step + 1, device=logits.device)
        gates = output.stack("gate_logits")[:, :, -1]                       # [T, b]
        chosen = q_exit_steps(exit_distribution(gates), self.cfg.exit_threshold)  # [b], 0-based
        per_step = torch.stack([_full_logits(s.logits[:, -1], vocab_size) for s in output.steps])
        logits = per_step.gather(0, chosen.view(1, -1, 1).expand(1, -1, per_step.shape[-1]))[0]
        return logits, chosen + 1


def _pick(logits: torch.Tensor, steps: torch.Tensor, cfg: SamplingConfig, generators, drawing) -> torch.Tensor:
    """[b, 3] on the logits' device: sampled token, its log-probability, the 1-based loop step
    it was read from."""
    sampled = sample(logits, cfg, generators, drawing)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    return torch.stack([sampled.double(), logprobs.double(), steps.double()], dim=-1)


def _forward_whole(pm, chunk, positions, reader, cache, vocab_size, cfg, generators, drawing) -> torch.Tensor:
    output = pm.model(chunk, positions, None, head=reader.head,
                      inference_contexts=cache.steps if cache is not None else None)
    return _pick(*reader.last_position(output, vocab_size), cfg, generators, drawing).cpu()


def _forward_pipelined(pm, chunk, positions, reader, cache, vocab_size, cfg, generators, drawing) -> torch.Tensor:
    """Through megatron-core's pipeline schedule (forward only), as PP micro-batches of rows:
    each loop step's chunk writes its rows into that step's cache. The last stage samples and
    broadcasts the picks to the other stages."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rows = chunk.shape[0] // pp
    microbatches = [{"tokens": chunk[i * rows:(i + 1) * rows], "positions": positions[i * rows:(i + 1) * rows],
                     "first_row": i * rows} for i in range(pp)]
    picked_logits = {}

    def forward_step(data_iterator, step_chunk):
        micro = next(data_iterator)
        if cache is not None:
            cache.steps[step_chunk.loop_step].batch_size_offset = micro["first_row"]
        output = step_chunk(micro["tokens"], micro["positions"], None, head=reader.head,
                            inference_contexts=cache.steps if cache is not None else None)

        def collect(out):
            picked_logits[micro["first_row"]] = reader.last_position(out, vocab_size)
            return torch.zeros((), device=chunk.device), torch.tensor(0, dtype=torch.int), {}

        return output, collect

    try:
        pm.forward_backward(forward_step_func=forward_step, data_iterator=[iter(microbatches) for _ in pm.chunks],
                            model=pm.chunks, num_microbatches=pp, seq_length=chunk.shape[1],
                            micro_batch_size=rows, forward_only=True)
    finally:
        pm.model.clear_deferred_steps()
    picks = torch.zeros(chunk.shape[0], 3, dtype=torch.float64, device=chunk.device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        logits = torch.cat([picked_logits[r][0] for r in sorted(picked_logits)])
        steps = torch.cat([picked_logits[r][1] for r in sorted(picked_logits)])
        picks = _pick(logits, steps, cfg, generators, drawing).to(chunk.device)
    dist.broadcast(picks, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return picks.cpu()


@contextlib.contextmanager
def _without_fp8(config):
    """megatron-core enters FP8 autocast per forward pass from ``config.fp8``
    (transformer_block.py); without it Transformer Engine's layers run their GEMMs in bf16 on
    the same weights. Restored afterwards for the training that continues."""
    fp8, config.fp8 = config.fp8, None
    try:
        yield
    finally:
        config.fp8 = fp8


@torch.no_grad()
def generate(pm, prompts: Sequence[Sequence[int]], vocab_size: int, cfg: SamplingConfig,
             row_seeds: Optional[Sequence[int]] = None) -> GenerationOutput:
    """Sample continuations of ``prompts`` (token ids) from ``pm`` (a PipelinedModel, any TP/PP
    layout; every rank calls this and every rank gets the same output). ``row_seeds``: one seed
    per prompt (default: derived from ``cfg.seed`` and the row), so that a prompt's samples can
    be made independent of which data-parallel rank and batch row it lands on."""
    with _without_fp8(pm.model.config):
        return _generate(pm, prompts, vocab_size, cfg, row_seeds)


def _generate(pm, prompts, vocab_size: int, cfg: SamplingConfig, row_seeds) -> GenerationOutput:
    model = pm.model
    if model.config.sequence_parallel:
        raise ValueError("generation decodes one position at a time: run it without sequence parallelism")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg.check(model.loop_steps)
    lengths = [len(p) for p in prompts]
    total = max(lengths) + cfg.max_new_tokens
    if total > model.max_sequence_length:
        raise ValueError(f"longest prompt {max(lengths)} + max_new_tokens {cfg.max_new_tokens} exceeds the "
                         f"model's max_position_embeddings {model.max_sequence_length}")
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    # the pipeline schedule runs PP micro-batches: pad the batch with copies of the first prompt
    padded = list(prompts) + [prompts[0]] * (-len(prompts) % pp)
    lengths = [len(p) for p in padded]
    device = next(model.parameters()).device
    batch = len(padded)
    tokens = torch.zeros(batch, total, dtype=torch.long)
    for row, prompt in enumerate(padded):
        tokens[row, :len(prompt)] = torch.tensor(list(prompt))
    in_prompt = torch.arange(total).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [b, total]

    reader = _Reader(model.loop_steps, cfg)
    if row_seeds is None:
        row_seeds = [cfg.seed * 1_000_003 + row for row in range(len(prompts))]
    elif len(row_seeds) != len(prompts):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
    seeds = list(row_seeds) + [row_seeds[0]] * (batch - len(prompts))
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    cache = LoopKVCache(model.loop_steps, batch, total) if cfg.use_cache else None
    forward = _forward_whole if pp == 1 else _forward_pipelined
    out = GenerationOutput([[] for _ in padded], [[] for _ in padded], [[] for _ in padded])
    finished = torch.zeros(batch, dtype=torch.bool)
    finished[len(prompts):] = True
    stop = torch.tensor(list(cfg.stop_tokens), dtype=torch.long)
    pm.eval()
    for position in range(min(lengths), total):
        # the positions this pass adds: the common prefix at first, then one at a time
        first = 0 if cache is None or cache.offset == 0 else position - 1
        chunk = tokens[:, first:position].to(device)
        positions = torch.arange(first, position, device=device).unsqueeze(0).expand(batch, -1)
        generating = ~in_prompt[:, position] & ~finished
        picks = forward(pm, chunk, positions, reader, cache, vocab_size, cfg, generators, generating)
        if cache is not None:
            cache.advance(position - first)
        sampled = picks[:, 0].long()
        tokens[:, position] = torch.where(in_prompt[:, position], tokens[:, position], sampled)
        for row in generating.nonzero().flatten().tolist():
            out.tokens[row].append(int(sampled[row]))
            out.logprobs[row].append(float(picks[row, 1]))
            out.exit_steps[row].append(int(picks[row, 2]))
        lengths_out = torch.tensor([len(t) for t in out.tokens])
        finished |= generating & (torch.isin(sampled, stop) | (lengths_out >= cfg.max_new_tokens))
        if bool(finished.all()):
            break
    n = len(prompts)
    return GenerationOutput(out.tokens[:n], out.logprobs[:n], out.exit_steps[:n])
