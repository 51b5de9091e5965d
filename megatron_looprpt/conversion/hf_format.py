"""Hugging Face Ouro checkpoints: config.json + safetensors (one file, or shards with an index).

Reading and writing are one tensor at a time (safetensors maps the file it reads; the files it
writes are streamed), so memory stays bounded by the largest tensor whatever the model size.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterable, List, Optional

import torch
from safetensors import safe_open

from megatron_looprpt.conversion.architecture import ConversionError, OuroArchitecture
from megatron_looprpt.conversion.tensor_map import hf_names, hf_shapes

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that are not carried over as assets: the weights and the config, which we rewrite.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_NOT_ASSETS = {CONFIG, INDEX_FILE, "pytorch_model.bin.index.json"}


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist ({what})") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None


def asset_files(directory: str) -> List[str]:
    """Tokenizer files, Ouro's remote code, generation config, ...: everything at the top of
    ``directory`` that is neither weights nor config.json."""
    return sorted(
        name for name in os.listdir(directory)
        if os.path.isfile(os.path.join(directory, name)) and name not in _NOT_ASSETS
        and not name.endswith(_WEIGHT_SUFFIXES) and not name.startswith(".")
    )


class HFLoader:
    """An Ouro checkpoint directory, read lazily."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise ConversionError(f"--load-dir {directory} is not a directory")
        self.directory = directory
        self.arch = OuroArchitecture.from_hf_config(
            _read_json(os.path.join(directory, CONFIG), "a Hugging Face checkpoint needs config.json"),
            os.path.join(directory, CONFIG))
        self._handles: Dict[str, object] = {}
        self._file_of = self._weight_map()
        self._check_tensors()
        self.assets = {name: os.path.join(directory, name) for name in asset_files(directory)}

    def _weight_map(self) -> Dict[str, str]:
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = _read_json(index, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index} has no weight_map (tensor name -> shard file): not a "
                                      "safetensors index")
            missing = sorted({f for f in weight_map.values()
                              if not os.path.isfile(os.path.join(self.directory, f))})
            if missing:
                raise ConversionError(
                    f"{index} names shards that are missing: {', '.join(missing)} "
                    "(download every shard the index lists)")
            return dict(weight_map)
        single = os.path.join(self.directory, SINGLE_FILE)
        if not os.path.isfile(single):
            found = [n for n in os.listdir(self.directory) if n.endswith(_WEIGHT_SUFFIXES)]
            hint = f" (found {', '.join(found)}: only safetensors are read)" if found else ""
            raise ConversionError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        return {name: SINGLE_FILE for name in self._handle(SINGLE_FILE).keys()}

    def _handle(self, file_name: str):
        if file_name not in self._handles:
            path = os.path.join(self.directory, file_name)
            try:
                self._handles[file_name] = safe_open(path, framework="pt")
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"{path} is not a readable safetensors file "
                                      f"({' '.join(str(error).split())[:200]})") from None
        return self._handles[file_name]

    def _check_tensors(self) -> None:
        expected = hf_shapes(self.arch)
        present = set(self._file_of)
        # A tied checkpoint may still store lm_head.weight (a copy of the embedding).
        extra = sorted(present - set(expected) - ({"lm_head.weight"} if self.arch.tie_word_embeddings else set()))
        missing = [name for name in expected if name not in present]
        if missing:
            raise ConversionError(f"{self.directory}: tensor {missing[0]} is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                  + "; the weights do not match config.json")
        if extra:
            raise ConversionError(f"{self.directory}: tensor {extra[0]} is not part of the Ouro "
                                  "architecture config.json describes"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for name, shape in expected.items():
            actual = tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())
            if actual != shape:
                raise ConversionError(f"{self.directory}: tensor {name} has shape {list(actual)} but "
                                      f"config.json implies {list(shape)}")

    @property
    def dtype(self) -> torch.dtype:
        first = hf_names(self.arch)[0]
        return self.get(first).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self._file_of[name]).get_tensor(name)


def parse_size(text: str) -> int:
    """'2GB', '500MB', '123' (bytes) -> bytes."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise ConversionError(f"--max-shard-size {text!r}: expected a size such as 2GB or 500MB")


def _plan_shards(names: Iterable[str], nbytes: Dict[str, int], max_shard_bytes: int) -> List[List[str]]:
    shards: List[List[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def save_hf(arch: OuroArchitecture, get, dtype: torch.dtype, directory: str, max_shard_bytes: int,
            assets: Optional[Dict[str, str]] = None) -> List[str]:
    """Write an Ouro checkpoint to ``directory`` (which must not exist): config.json, the
    weights (``get(hf_name) -> tensor``) in shards of at most ``max_shard_bytes``, and the
    ``assets`` (file name -> path). Written into a temporary sibling and renamed at the end,
    so an interrupted conversion leaves no half checkpoint. Returns the weight files."""
    names = hf_names(arch)
    element = torch.empty((), dtype=dtype).element_size()
    nbytes = {name: element * _numel(shape) for name, shape in hf_shapes(arch).items()}
    shards = _plan_shards(names, nbytes, max_shard_bytes)
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    tmp = f"{os.path.normpath(directory)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shapes = hf_shapes(arch)
    try:
        for file_name, shard in zip(files, shards):
            _write_safetensors(os.path.join(tmp, file_name), shard, shapes, dtype, get)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())},
                     "weight_map": {name: f for f, shard in zip(files, shards) for name in shard}}
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
        dtype_name = str(dtype).replace("torch.", "")
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(arch.to_hf_config(dtype_name), f, indent=2)
        for name, path in (assets or {}).items():
            shutil.copy2(path, os.path.join(tmp, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # a failed conversion leaves nothing behind
        raise
    os.rename(tmp, directory)
    return files


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_safetensors(path: str, names: List[str], shapes: Dict[str, tuple], dtype: torch.dtype, get) -> None:
    """One safetensors file, streamed: the header is planned from shapes, then each tensor is
    fetched, written and dropped (safetensors' own writer needs the whole file in memory)."""
    element = torch.empty((), dtype=dtype).element_size()
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        end = offset + element * _numel(shapes[name])
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                         "data_offsets": [offset, end]}
        offset = end
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name in names:
            tensor = get(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ConversionError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(shapes[name])}")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
