"""megatron_looprpt checkpoints (megatron-core dist_checkpointing, torch_dist) on the converter's side.

A dist_checkpointing checkpoint stores global tensors, so one written here loads under any
TP/PP/DP layout; the target layout decides only the vocabulary padding (a multiple of
divisible_by x TP) and what is checked. Writing never holds the model: the checkpoint is
planned from shapes alone and each tensor chunk (one layer of one kind of weight) is built
from the source when torch.distributed.checkpoint's writer asks for it. Reading fetches one
layer's chunk of one key at a time.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save

from megatron_looprpt.arguments import per_step_weights
from megatron_looprpt.conversion.architecture import ConversionError, OuroArchitecture
from megatron_looprpt.conversion.tensor_map import (
    EMBEDDING,
    GLOBAL_TENSORS,
    HF_LAYER_PREFIX,
    LAYER_TENSORS,
    from_mcore,
    global_keys,
    mcore_shape,
    to_mcore,
)
from megatron_looprpt.models.builder import pad_vocab_size
from megatron_looprpt.training import checkpointing

ASSETS_DIR = "hf_assets"
# Beside a run's tokenizer.json, only these travel to an export (that directory may hold data).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "generation_config.json")
_STORAGE_BACKEND = ("torch_dist", 1)

# mcore key -> (layer or None for global keys)  ->  tensor, called by the writer
Materialize = Callable[[str, Optional[int]], torch.Tensor]


class _LazyPlanner(MCoreSavePlanner):
    """Plans from the (meta-device) state dict; builds each tensor chunk only when written."""

    def __init__(self, materialize: Materialize, **kwargs):
        super().__init__(**kwargs)
        self._materialize = materialize

    def resolve_data(self, write_item):
        if write_item.tensor_data is None:  # serialized objects: already bytes
            return super().resolve_data(write_item)
        key, offset = write_item.index.fqn, write_item.index.offset
        layer = offset[0] if key in LAYER_TENSORS else None
        tensor = self._materialize(key, layer)
        return tensor.unsqueeze(0) if layer is not None else tensor


class _LazyTorchDistSave(TorchDistSaveShardedStrategy):
    """torch_dist, written one chunk at a time by torch's single-threaded FileSystemWriter
    (megatron-core's async writer stages every tensor in memory first)."""

    def __init__(self, materialize: Materialize):
        super().__init__(*_STORAGE_BACKEND)
        self._materialize = materialize

    def save(self, sharded_state_dict, checkpoint_dir):
        state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        dcp_save(mcore_to_pyt_state_dict(state_dict, False),
                 storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                 planner=_LazyPlanner(self._materialize, dedup_replicated_tensors=False,
                                      flatten_state_dict=False))


def _planned(key: str, shape: Tuple[int, ...], dtype: torch.dtype, layer: Optional[int],
             num_layers: int, prefix: str) -> ShardedTensor:
    data = torch.empty(shape, dtype=dtype, device="meta")
    if layer is None:
        return ShardedTensor.from_rank_offsets(prefix + key, data, replica_id=0)
    # the layout a megatron TransformerBlock uses: the layer index as a prepended global axis
    return ShardedTensor.from_rank_offsets(prefix + key, data, (0, layer, num_layers),
                                           replica_id=0, prepend_axis_num=1)


def save_mcore(arch: OuroArchitecture, get, dtype: torch.dtype, save_dir: str, tensor_parallel: int,
               pipeline_parallel: int, divisible_by: int, assets: Dict[str, str],
               source_args: Optional[Dict[str, Any]] = None) -> str:
    """Write the model (``get(hf_name) -> tensor``) as iteration 0 of ``save_dir`` for
    ``--load`` under TP x PP (and any layout that pads the vocabulary alike). Returns the
    checkpoint directory. ``source_args``: the run arguments of a megatron source."""
    arch.check_layout(tensor_parallel, pipeline_parallel, "--target-format mcore")
    padded = pad_vocab_size(arch.vocab_size, divisible_by, tensor_parallel)
    asset_dir = os.path.abspath(os.path.join(save_dir, ASSETS_DIR))
    os.makedirs(asset_dir, exist_ok=True)
    for name, path in assets.items():
        shutil.copy2(path, os.path.join(asset_dir, name))
    tokenizer = os.path.join(asset_dir, "tokenizer.json")
    args = arch.checkpoint_args(tensor_parallel, pipeline_parallel, divisible_by,
                                tokenizer if os.path.isfile(tokenizer) else None,
                                bf16=dtype == torch.bfloat16, source_args=source_args)

    def materialize(key: str, layer: Optional[int]) -> torch.Tensor:
        if layer is None:
            sources = [get(GLOBAL_TENSORS[key])]
        else:
            sources = [get(HF_LAYER_PREFIX.format(layer) + n) for n in LAYER_TENSORS[key]]
        return to_mcore(key, sources, arch, padded).to(dtype).contiguous()

    model = {key: _planned(key, mcore_shape(key, arch, padded), dtype, None, arch.num_layers, "")
             for key in global_keys(arch)}
    for key in LAYER_TENSORS:
        model[key] = [_planned(key, mcore_shape(key, arch, padded), dtype, i, arch.num_layers, "")
                      for i in range(arch.num_layers)]
    layout = {"tp": tensor_parallel, "pp": pipeline_parallel, "dp": 1,
              "world_size": tensor_parallel * pipeline_parallel}
    meta = checkpointing.checkpoint_meta(0, layout, args, state={"converted_from": "hf"}, has_rng=False)
    return checkpointing.write_checkpoint(save_dir, 0, {"model": model}, meta,
                                          sharded_strategy=_LazyTorchDistSave(materialize))


class McoreLoader:
    """A megatron_looprpt checkpoint (a save directory or one iter_* directory), read one
    chunk at a time. ``model``: "student" (the trained model) or "teacher" (LoopRPT's EMA
    teacher, saved beside it)."""

    def __init__(self, load_dir: str, vocab_size: Optional[int] = None, model: str = "student"):
        try:
            info = checkpointing.read_checkpoint_info(load_dir)
        except checkpointing.CheckpointError as error:
            raise ConversionError(f"--load-dir {load_dir}: {error}") from None
        if info is None:
            raise ConversionError(f"--load-dir {load_dir}: no megatron_looprpt checkpoint there")
        if not info.get("args"):
            raise ConversionError(f"--load-dir {load_dir}: the checkpoint saved no run arguments, "
                                  "so its model shape is unknown")
        self.path, self.args = info["path"], info["args"]
        extra = per_step_weights(self.args)
        if extra:  # conversion goes through Ouro's tensors, which have nothing per loop step
            flag, _, weights = extra[0]
            raise ConversionError(f"--load-dir {load_dir}: trained with {flag}, whose per-step {weights} "
                                  f"Ouro's format cannot hold; only checkpoints without {flag} convert")
        self.prefix = ""
        if model == "teacher":
            if "teacher" not in info.get("extra_models", []):
                raise ConversionError(f"--source-model teacher: {self.path} holds no LoopRPT teacher")
            self.prefix = "teacher."
        self._stored = dist_checkpointing.load_tensors_metadata(self.path)
        self.arch = OuroArchitecture.from_checkpoint_args(self.args, self._vocab_size(vocab_size))
        self._check_tensors()
        self.assets = self._assets()
        self._cached: Tuple[Optional[Tuple[str, Optional[int]]], list] = (None, [])

    def _vocab_size(self, override: Optional[int]) -> int:
        rows = self._stored[EMBEDDING].global_shape[0] if EMBEDDING in self._stored else None
        if override is not None:
            vocab = override
        elif self.args.get("hf_config", {}).get("vocab_size"):
            vocab = self.args["hf_config"]["vocab_size"]
        else:
            vocab = self._tokenizer_vocab()
        if rows is not None and vocab > rows:
            raise ConversionError(
                f"{self.path}: the vocabulary has {vocab} entries but the checkpoint's embedding "
                f"only {rows} rows (give the true size with --vocab-size)")
        return vocab

    def _tokenizer_vocab(self) -> int:
        from megatron_looprpt.data.tokenizers import build_tokenizer

        kind, model_file = self.args.get("tokenizer_type"), self.args.get("tokenizer_model")
        if kind != "NullTokenizer" and not (model_file and os.path.isfile(model_file)):
            raise ConversionError(
                f"{self.path}: its tokenizer {model_file} is gone, so the true vocabulary (without "
                "Megatron's padding) is unknown; give it with --vocab-size")
        size = build_tokenizer(kind, model_file, self.args.get("vocab_size")).vocab_size
        return max(size, self.args.get("vocab_size") or 0)

    def _check_tensors(self) -> None:
        for key in [*global_keys(self.arch), *LAYER_TENSORS]:
            if self.prefix + key not in self._stored:
                raise ConversionError(f"{self.path}: tensor {self.prefix + key} is missing "
                                      "(not a looped-model checkpoint of this shape?)")
        for key in LAYER_TENSORS:
            stored = self._stored[self.prefix + key].global_shape
            expected = (self.arch.num_layers, *mcore_shape(key, self.arch, self._padded_rows()))
            if tuple(stored) != expected:
                raise ConversionError(f"{self.path}: {self.prefix + key} has shape {list(stored)}, "
                                      f"its saved arguments imply {list(expected)}")

    def _padded_rows(self) -> int:
        return self._stored[self.prefix + EMBEDDING].global_shape[0]

    def _assets(self) -> Dict[str, str]:
        """Files to carry to a Hugging Face export: the hf_assets a conversion stored (beside
        this checkpoint, or where the run's tokenizer lives), else the run's tokenizer files."""
        from megatron_looprpt.conversion.hf_format import asset_files

        tokenizer = self.args.get("tokenizer_model") or ""
        for directory in (os.path.join(os.path.dirname(self.path), ASSETS_DIR), os.path.dirname(tokenizer)):
            if os.path.basename(directory) == ASSETS_DIR and os.path.isdir(directory):
                return {name: os.path.join(directory, name) for name in asset_files(directory)}
        if not os.path.isfile(tokenizer):
            return {}
        directory = os.path.dirname(tokenizer)
        names = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(directory, n))]
        if os.path.basename(tokenizer) not in names:
            names.append(os.path.basename(tokenizer))
        return {name: os.path.join(directory, name) for name in names}

    @property
    def dtype(self) -> torch.dtype:
        return self._stored[self.prefix + EMBEDDING].dtype

    def _read(self, key: str, layer: Optional[int]) -> list:
        """The HF tensors held by one chunk of ``key``; the last chunk is kept, since its HF
        tensors are asked for one after another."""
        if self._cached[0] != (key, layer):
            stored = self._stored[self.prefix + key]
            shape = tuple(stored.global_shape[1:] if layer is not None else stored.global_shape)
            if layer is None:
                wanted = ShardedTensor.from_rank_offsets(stored.key, torch.empty(shape, dtype=stored.dtype),
                                                         replica_id=0)
            else:
                wanted = ShardedTensor.from_rank_offsets(
                    stored.key, torch.empty((1, *shape), dtype=stored.dtype),
                    (0, layer, self.arch.num_layers), replica_id=0)
            tensor = dist_checkpointing.load({"t": wanted}, self.path, validate_access_integrity=False)["t"]
            self._cached = ((key, layer), from_mcore(key, tensor[0] if layer is not None else tensor, self.arch))
        return self._cached[1]

    def get(self, name: str) -> torch.Tensor:
        if name.startswith("model.layers."):
            layer_text, suffix = name[len("model.layers."):].split(".", 1)
            for key, parts in LAYER_TENSORS.items():
                if suffix in parts:
                    return self._read(key, int(layer_text))[parts.index(suffix)]
        for key, hf_name in GLOBAL_TENSORS.items():
            if hf_name == name:
                return self._read(key, None)[0]
        raise KeyError(name)
