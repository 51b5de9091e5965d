"""Evaluate checkpoints on a held-out split under any TP/PP/DP layout.

A checkpoint carries the arguments of the run that wrote it (model shape, tokenizer, data,
batch sizes); the evaluation starts from those and overrides only the layout, the data and the
batch sizes it is given. The model is rebuilt for the current layout and the weights are
resharded on load (``checkpointing.load_checkpoint``), so any layout evaluates any checkpoint.

Forward-only passes go through the same megatron pipeline schedules as training
(``schedule.eval_step``); each micro-batch's loss function returns metric sums
(``metrics.token_sums``), which ``reduce_metrics`` adds over micro-batches and data-parallel
ranks and shares with every pipeline stage. The global batches, and hence the totals, do not
depend on the layout: the default global batch is the checkpoint's, not micro-batch x DP.

The reference model whose next-token entropy sorts tokens into difficulty buckets is, by
default, the evaluated (--load) model itself at its last loop step. ``--reference CKPT`` takes
it from another checkpoint instead (at that model's last loop step). A ``--compare`` model is
bucketed by the same reference as the --load model, so per-bucket numbers line up. With
``--difficulty-quantiles`` the bucket thresholds are quantiles of the reference entropy over
every evaluated token, so a first pass computes the reference entropies of all global batches
(gathered over data-parallel ranks) before the metric passes bucket any token.

Held-out tokens are scored once: megatron's GPTDataset starts over on a split's documents when
asked for more sequences than it holds, so the number of global batches is capped at what one
epoch of the split gives (``data.datasets.held_out_batches``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_looprpt import parallel
from megatron_looprpt.arguments import ConfigError, validate_args
from megatron_looprpt.data.datasets import (
    build_data_iterator,
    build_datasets,
    held_out_batches,
    validate_data_prefixes,
)
from megatron_looprpt.data.tokenizers import build_tokenizer, model_vocab_size
from megatron_looprpt.evaluation import metrics, task as task_metrics
from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.models.looped_gpt import HeadRequest
from megatron_looprpt.training import checkpointing
from megatron_looprpt.training.loop import model_config
from megatron_looprpt.training.saved_run import check_vocab_padding, read_saved_run, saved_model_args
from megatron_looprpt.schedule import eval_step, make_forward_step

SCHEMA = "megatron_looprpt.evaluation/1"
# Held-out splits, by their index in megatron's train,valid,test split.
_SPLIT_INDEX = {"valid": 1, "test": 2}
SPLIT_NAMES = tuple(_SPLIT_INDEX)
_TOKENIZER_FIELDS = ("tokenizer_type", "tokenizer_model", "vocab_size")
_EVAL_HEAD = HeadRequest(label_logprobs=True, entropy=True, predictions=True, recompute=False)


@dataclass
class EvalConfig:
    """What to evaluate and how; None means "as the --load checkpoint's run had it"."""

    load: str
    data_path: Optional[List[str]] = None
    split: Optional[str] = None
    split_name: str = "valid"
    eval_iters: int = 10
    micro_batch_size: Optional[int] = None
    global_batch_size: Optional[int] = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    exit_thresholds: Tuple[float, ...] = metrics.DEFAULT_EXIT_THRESHOLDS
    exit_threshold: Optional[float] = None
    difficulty_thresholds: Tuple[float, float] = metrics.DEFAULT_DIFFICULTY_THRESHOLDS
    # When given, the thresholds are these quantiles of the reference entropy instead.
    difficulty_quantiles: Optional[Tuple[float, float]] = None
    reference: Optional[str] = None
    compare: Optional[str] = None
    tokenizer_model: Optional[str] = None
    # prompt/completion JSONL scored per loop step and per group (evaluation/task.py)
    task_data: Optional[str] = None
    task_group_key: str = "k"


@dataclass
class Checkpoint:
    """One checkpoint as this evaluation runs it."""

    flag: str                      # the CLI flag that named it, for errors and the report
    path: str                      # the resolved iter_* directory
    iteration: int
    saved: dict                    # the arguments its run saved
    args: argparse.Namespace       # those, with this evaluation's overrides, validated
    model: Optional[LoopedModelConfig] = None


# ---------------------------------------------------------------------------------------------
# checks and checkpoint arguments (nothing built, no process group)


def check_config(cfg: EvalConfig) -> None:
    if cfg.eval_iters < 1:
        raise ConfigError(f"--eval-iters must be >= 1, got {cfg.eval_iters}")
    if cfg.data_path is not None and not cfg.data_path:
        raise ConfigError("--data-path needs a dataset prefix or blend (leave the flag out to use the checkpoint's)")
    if cfg.split_name not in SPLIT_NAMES:
        raise ConfigError(f"--split-name {cfg.split_name} must be one of {', '.join(SPLIT_NAMES)}")
    if not cfg.exit_thresholds:
        raise ConfigError("--exit-thresholds needs at least one value")
    for q in cfg.exit_thresholds:
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"--exit-thresholds: {q} is not in (0, 1]")
    if cfg.exit_threshold is not None and not 0.0 < cfg.exit_threshold <= 1.0:
        raise ConfigError(f"--exit-threshold {cfg.exit_threshold} is not in (0, 1]")
    t1, t2 = cfg.difficulty_thresholds
    if t1 > t2:
        raise ConfigError(f"--difficulty-thresholds {t1} {t2}: the first (easy/medium) must not "
                          "exceed the second (medium/hard)")
    if cfg.task_data is not None and not os.path.isfile(cfg.task_data):
        raise ConfigError(f"--task-data {cfg.task_data} does not exist (prompt/completion JSONL, e.g. "
                          "composition_heldout.jsonl from data/composition.py)")
    if cfg.difficulty_quantiles is not None:
        q1, q2 = cfg.difficulty_quantiles
        if not 0.0 <= q1 <= q2 <= 1.0:
            raise ConfigError(f"--difficulty-quantiles {q1:g} {q2:g}: need 0 <= Q1 <= Q2 <= 1")


def _run_args(saved: dict, cfg: EvalConfig, imposed: Optional[dict]) -> argparse.Namespace:
    """The saved run's arguments with this evaluation's data, batch sizes and layout.
    ``imposed``: settings every model must share with the --load model (tokenizer, data)."""
    args = saved_model_args(saved)
    given = {"data_path": cfg.data_path, "split": cfg.split, "micro_batch_size": cfg.micro_batch_size,
             "global_batch_size": cfg.global_batch_size, "exit_threshold": cfg.exit_threshold,
             "tokenizer_model": cfg.tokenizer_model}
    args.update({name: value for name, value in given.items() if value is not None})
    args.update(imposed or {})
    args.update(
        load=None, save=None, save_interval=None, exit_on_missing_checkpoint=False, mock_data=False,
        eval_iters=cfg.eval_iters, tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        sequence_parallel=cfg.sequence_parallel,
    )
    return argparse.Namespace(**args)


def read_checkpoint(flag: str, load_dir: str, cfg: EvalConfig, imposed: Optional[dict] = None) -> Checkpoint:
    """Read and validate a checkpoint's arguments for this evaluation."""
    info = read_saved_run(flag, load_dir)
    args = _run_args(info["args"], cfg, imposed)
    if imposed is None:
        _check_data(args.data_path)
    try:
        validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        raise ConfigError(f"{flag} {load_dir}: {error}") from None
    return Checkpoint(flag=flag, path=os.path.abspath(info["path"]), iteration=int(info["iteration"]),
                      saved=info["args"], args=args)


def _check_data(data_path: Optional[List[str]]) -> None:
    """The data must exist and read as megatron indexed datasets; errors name --data-path."""
    if not data_path:
        raise ConfigError("--data-path is required (the checkpoint's run used none: it trained on "
                          "--mock-data)")
    try:
        prefixes, _ = validate_data_prefixes(data_path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    for prefix in prefixes:
        try:
            IndexedDataset(prefix)
        except Exception as error:  # noqa: BLE001 - megatron asserts on a bad header
            raise ConfigError(f"--data-path {prefix}: not a readable megatron indexed dataset "
                              f"({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None


def _tokenizer_fields(args) -> dict:
    get = args.get if isinstance(args, dict) else lambda name: getattr(args, name)
    return {name: get(name) for name in _TOKENIZER_FIELDS}


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _same_tokenizer(a: dict, b: dict) -> bool:
    if a["tokenizer_type"] != b["tokenizer_type"]:
        return False
    if a["tokenizer_type"] == "NullTokenizer":
        return a["vocab_size"] == b["vocab_size"]
    paths = (a["tokenizer_model"] or "", b["tokenizer_model"] or "")
    if all(os.path.isfile(p) for p in paths):
        return _file_digest(paths[0]) == _file_digest(paths[1])
    # A tokenizer moved since training can only be matched by name.
    return os.path.basename(paths[0]) == os.path.basename(paths[1])


def read_checkpoints(cfg: EvalConfig) -> Dict[str, Checkpoint]:
    """The --load, --compare and --reference checkpoints (those given), validated, with their
    model configs for the current layout; raises ConfigError naming the flag."""
    check_config(cfg)
    primary = read_checkpoint("--load", cfg.load, cfg)
    checkpoints = {"load": primary}
    tokenizer = _tokenizer_fields(primary.args)
    # Every model reads the --load model's token ids, sequences and batches.
    imposed = {**tokenizer, **{name: getattr(primary.args, name) for name in
                               ("data_path", "split", "seq_length", "micro_batch_size", "global_batch_size")}}
    for role, path in (("compare", cfg.compare), ("reference", cfg.reference)):
        if path is not None:
            ckpt = read_checkpoint(f"--{role}", path, cfg, imposed)
            if not _same_tokenizer(_tokenizer_fields(ckpt.saved), _tokenizer_fields(primary.saved)):
                raise ConfigError(f"--{role} {path}: its tokenizer differs from the --load model's "
                                  "(both must read the same token ids)")
            checkpoints[role] = ckpt
    vocab_size = model_vocab_size(build_tokenizer(**tokenizer), tokenizer.get("vocab_size"))
    for ckpt in checkpoints.values():
        ckpt.model = model_config(ckpt.args, vocab_size)
        check_vocab_padding(ckpt.flag, ckpt.path, ckpt.saved, ckpt.model.padded_vocab_size,
                            cfg.tensor_model_parallel_size)
    return checkpoints


# ---------------------------------------------------------------------------------------------
# models, data, passes


def _load_model(ckpt: Checkpoint):
    pm = build_model(ckpt.model, seed=ckpt.args.seed, wrap_ddp=False)
    loaded = checkpointing.load_checkpoint(ckpt.path, pm, None, None, load_optim=False, load_rng=False)
    if loaded is None:
        raise ConfigError(f"{ckpt.flag} {ckpt.path}: the checkpoint disappeared before it was loaded")
    return pm


def eval_batches(args: argparse.Namespace, split_name: str) -> dict:
    """How many global batches to evaluate (``data.datasets.held_out_batches``); a split smaller
    than one global batch is an error."""
    try:
        batches, held = held_out_batches(args.data_path, args.split, _SPLIT_INDEX[split_name], args.seq_length,
                                         args.eval_iters, args.global_batch_size, verb="evaluating")
    except ValueError as error:
        raise ConfigError(f"{error}: evaluate another --split-name or pass a --split with a nonzero "
                          f"{split_name} share") from None
    if batches == 0:
        raise ConfigError(f"--eval-iters/--global-batch-size: one global batch of {args.global_batch_size} "
                          f"sequences is more than the {split_name} split of --split {args.split} holds "
                          f"({held} sequences of {args.seq_length} tokens): lower --global-batch-size or "
                          f"give the split a larger {split_name} share")
    return {"eval_iters": args.eval_iters, "evaluated_batches": batches, "split_sequences": held}


def _eval_dataset(args: argparse.Namespace, tokenizer, split_name: str, num_samples: int):
    index = _SPLIT_INDEX[split_name]
    # Only the evaluated split is drawn from; the others get the smallest size the builder takes.
    sizes = [1, 1, 1]
    sizes[index] = num_samples
    try:
        datasets = build_datasets(args.data_path, args.split, args.seq_length, args.seed, tokenizer,
                                  num_samples=sizes)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    return datasets[index]


def _global_batches(dataset, args: argparse.Namespace, device: torch.device, num_batches: int):
    """``num_batches`` global batches, this data-parallel rank's micro-batches of each."""
    iterator = build_data_iterator(dataset, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size())
    for _ in range(num_batches):
        yield [{name: value.to(device) for name, value in next(iterator).items()}
               for _ in range(args.num_microbatches)]


def _no_loss(output) -> tuple:
    return torch.zeros((), device=output.steps[-1].gate_logits.device), torch.tensor(0, dtype=torch.int), {}


def reference_entropy(pm, batches) -> Deque[torch.Tensor]:
    """The reference model's next-token entropy at its last loop step, one [b, s] tensor per
    micro-batch in order (on the last pipeline stage; empty elsewhere)."""
    collected: Deque[torch.Tensor] = collections.deque()
    head = HeadRequest(label_logprobs=False, entropy=True, recompute=False,
                       vocab_steps=(pm.model.loop_steps - 1,))

    def objective(batch, output):
        collected.append(output.steps[-1].entropy)
        return _no_loss(output)

    eval_step(pm, batches, make_forward_step(objective, head))
    return collected


def _gather_data_parallel(values: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of every data-parallel rank concatenated (lengths may differ by rank)."""
    group = parallel_state.get_data_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return values
    lengths = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(size)]
    torch.distributed.all_gather(lengths, torch.tensor([values.numel()], device=values.device), group=group)
    longest = int(max(length.item() for length in lengths))
    padded = [torch.zeros(longest, dtype=values.dtype, device=values.device) for _ in range(size)]
    torch.distributed.all_gather(padded, torch.nn.functional.pad(values, (0, longest - values.numel())), group=group)
    return torch.cat([chunk[:int(length.item())] for chunk, length in zip(padded, lengths)])


def _from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's ``values`` on every stage (the others pass a tensor of the
    same shape)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return values


def reference_pass(pm, global_batches) -> Tuple[List[Deque[torch.Tensor]], List[torch.Tensor]]:
    """``reference_entropy`` of every global batch, and the entropies of its valid (loss-masked)
    tokens, flattened (both on the last pipeline stage; empty elsewhere)."""
    entropies, valid = [], []
    for batches in global_batches:
        collected = reference_entropy(pm, batches)
        entropies.append(collected)
        valid += [entropy[batch["loss_mask"] > 0].float() for entropy, batch in zip(collected, batches)]
    return entropies, valid


def quantile_thresholds(valid: List[torch.Tensor], quantiles: Tuple[float, float],
                        device: torch.device) -> Tuple[float, float]:
    """The ``quantiles`` of the valid reference entropies (``reference_pass``) of every
    data-parallel rank, the same on every rank."""
    thresholds = torch.zeros(len(quantiles), dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        values = _gather_data_parallel(torch.cat(valid).to(device))
        thresholds = torch.tensor(metrics.entropy_quantiles(values, quantiles), dtype=torch.float64, device=device)
    return tuple(_from_last_stage(thresholds).tolist())


class _EvalObjective:
    """The forward-only loss function: the metric sums of one micro-batch. Records the
    reference entropy it used so that a second model can be bucketed alike."""

    def __init__(self, spec: metrics.MetricSpec, reference: Optional[Deque[torch.Tensor]]):
        self.spec = spec
        self.reference = reference
        self.used: Deque[torch.Tensor] = collections.deque()

    def __call__(self, batch, output):
        entropy = output.steps[-1].entropy if self.reference is None else self.reference.popleft()
        self.used.append(entropy)
        sums = metrics.token_sums(
            batch["labels"], batch["loss_mask"], output.stack("label_logprobs"),
            output.stack("predictions"), output.stack("entropy"), output.stack("gate_logits"),
            entropy, self.spec,
        )
        loss, num_tokens, _ = _no_loss(output)
        return loss, num_tokens, sums


def evaluate_batch(pm, batches, spec: metrics.MetricSpec,
                   reference: Optional[Deque[torch.Tensor]] = None):
    """Reduced metric sums of one global batch (identical on every rank), and the reference
    entropies used (last stage)."""
    objective = _EvalObjective(spec, reference)
    sums = eval_step(pm, batches, make_forward_step(objective, _EVAL_HEAD))
    return sums, objective.used


def evaluate_task(pm, problems: "task_metrics.TaskSet", args: argparse.Namespace, device: torch.device) -> dict:
    """Answer accuracy on ``problems`` per loop step and group (``evaluation/task.py``)."""
    rows = task_metrics.pack_rows(problems, args.seq_length, build_tokenizer(**_tokenizer_fields(args)).eod)
    head = HeadRequest(label_logprobs=True, predictions=True, recompute=False)

    def objective(batch, output):
        sums = task_metrics.task_sums(batch, output.stack("predictions"), output.stack("label_logprobs"),
                                      output.stack("gate_logits"), len(problems.groups), args.exit_threshold)
        loss, num_tokens, _ = _no_loss(output)
        return loss, num_tokens, sums

    totals = None
    for batches in task_metrics.global_batches(rows, args.seq_length, args.micro_batch_size,
                                               args.num_microbatches, device):
        totals = metrics.add_sums(totals, eval_step(pm, batches, make_forward_step(objective, head)))
    return task_metrics.summarize_task(totals, problems, pm.model.loop_steps, args.exit_threshold)


# ---------------------------------------------------------------------------------------------
# the whole evaluation


def _spec(cfg: EvalConfig, ckpt: Checkpoint, difficulty_thresholds: Tuple[float, float]) -> metrics.MetricSpec:
    return metrics.MetricSpec(exit_thresholds=tuple(cfg.exit_thresholds),
                              default_threshold=ckpt.args.exit_threshold,
                              difficulty_thresholds=tuple(difficulty_thresholds))


def _describe_model(ckpt: Checkpoint, role: str, reference: dict) -> dict:
    args = ckpt.args
    return {
        "role": role, "checkpoint": ckpt.path, "iteration": ckpt.iteration,
        "num_layers": args.num_layers, "hidden_size": args.hidden_size,
        "loop_steps": args.loop_steps, "rl_algo": ckpt.saved.get("rl_algo", "none"),
        "exit_gate_training": args.exit_gate_training, "reference": reference,
    }


def _describe_difficulty(thresholds: Tuple[float, float], quantiles: Optional[Tuple[float, float]],
                         summary: dict) -> dict:
    t1, t2 = thresholds
    return {
        "measure": "next-token entropy (nats) of the reference model at its last loop step",
        # None: thresholds given in nats; else the quantiles of the evaluated tokens' entropy they are.
        "quantiles": None if quantiles is None else list(quantiles),
        "thresholds": [t1, t2],
        "buckets": {"easy": f"H < {t1:.4g}", "medium": f"{t1:.4g} <= H < {t2:.4g}", "hard": f"{t2:.4g} <= H"},
        # Every evaluated model is bucketed alike.
        "bucket_tokens": {name: bucket["tokens"] for name, bucket in summary["buckets"].items()},
    }


def _reference_description(checkpoints: Dict[str, Checkpoint]) -> dict:
    if "reference" in checkpoints:
        ref = checkpoints["reference"]
        return {"checkpoint": ref.path, "iteration": ref.iteration, "step": ref.args.loop_steps,
                "description": f"--reference model at its last loop step ({ref.args.loop_steps})"}
    ref = checkpoints["load"]
    return {"checkpoint": None, "iteration": ref.iteration, "step": ref.args.loop_steps,
            "description": f"the --load model itself at its last loop step ({ref.args.loop_steps})"}


def run_evaluation(cfg: EvalConfig) -> dict:
    """Evaluate; returns the report (the same on every rank). Checks everything it can before
    it initializes the process groups of the requested layout (torchrun's env:// or a
    1-process group)."""
    checkpoints = read_checkpoints(cfg)
    primary = checkpoints["load"]
    args = primary.args
    counts = eval_batches(args, cfg.split_name)
    num_batches = counts["evaluated_batches"]
    device = parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                 args.seed)
    tokenizer = build_tokenizer(**_tokenizer_fields(args))
    problems = None if cfg.task_data is None else task_metrics.read_task(cfg.task_data, tokenizer, cfg.task_group_key)
    dataset = _eval_dataset(args, tokenizer, cfg.split_name, num_batches * args.global_batch_size)
    models = {role: _load_model(ckpt) for role, ckpt in checkpoints.items()}
    roles = [role for role in ("load", "compare") if role in models]

    thresholds, references = tuple(cfg.difficulty_thresholds), None
    if cfg.difficulty_quantiles is not None:
        # Every token's reference entropy is needed before the first one is bucketed.
        references, valid = reference_pass(models.get("reference", models["load"]),
                                           _global_batches(dataset, args, device, num_batches))
        thresholds = quantile_thresholds(valid, cfg.difficulty_quantiles, device)
    specs = {role: _spec(cfg, checkpoints[role], thresholds) for role in roles}

    totals: Dict[str, Optional[Dict[str, torch.Tensor]]] = {role: None for role in roles}
    for i, batches in enumerate(_global_batches(dataset, args, device, num_batches)):
        if references is not None:
            reference = references[i]
        else:
            reference = reference_entropy(models["reference"], batches) if "reference" in models else None
        sums, used = evaluate_batch(models["load"], batches, specs["load"], reference)
        totals["load"] = metrics.add_sums(totals["load"], sums)
        if "compare" in models:
            sums, _ = evaluate_batch(models["compare"], batches, specs["compare"], used)
            totals["compare"] = metrics.add_sums(totals["compare"], sums)

    reference = _reference_description(checkpoints)
    summaries = {role: metrics.summarize(totals[role], specs[role]) for role in roles}
    if problems is not None:
        for role in roles:
            summaries[role]["task"] = evaluate_task(models[role], problems, checkpoints[role].args, device)
    return {
        "schema": SCHEMA,
        "data": {
            "data_path": list(args.data_path), "split": args.split, "split_name": cfg.split_name,
            "seq_length": args.seq_length, **counts,
            "global_batch_size": args.global_batch_size, "micro_batch_size": args.micro_batch_size,
        },
        "layout": {
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "data_parallel_size": args.data_parallel_size,
            "sequence_parallel": bool(args.sequence_parallel),
        },
        "task_data": cfg.task_data,
        "difficulty": _describe_difficulty(thresholds, cfg.difficulty_quantiles, summaries["load"]),
        "exit_thresholds": list(cfg.exit_thresholds),
        "models": [{**_describe_model(checkpoints[role], role, reference), **summaries[role]} for role in roles],
    }
