"""Parent models held in memory for a whole study: configs, tensor headers, and the tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from merge_core.errors import MergeInputError, ParentError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def model_key(model: object) -> str:
    """The key a config's model reference and a loaded parent share: the real local path."""
    path = str(model)
    return os.path.realpath(path) if os.path.exists(path) else path


def finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor`` (integer tensors hold neither)."""
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


@dataclass(frozen=True)
class TensorHeader:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


@dataclass
class Parent:
    """One HF model folder: its config, its tensor headers, and (once loaded) its tensors."""

    key: str
    config: PretrainedConfig
    headers: dict[str, TensorHeader]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> Parent:
        """The folder's config and tensor headers; safetensors parses each header and checks that the
        file covers every tensor, so a truncated or damaged file is refused here, by name."""
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise MergeInputError(f"model {path}: no config.json there (missing parent?)")
        headers = {}
        for file, names in _weight_files(folder, path).items():
            try:
                with safe_open(file, framework="pt") as reader:
                    stored = set(reader.keys())
                    for name in stored if names is None else names:
                        if name not in stored:
                            raise MergeInputError(
                                f"model {path}: tensor {name} is not in {file.name}, as its index says"
                            )
                        if name in headers:
                            raise MergeInputError(
                                f"model {path}: tensor {name} is in both {headers[name].file.name} and {file.name}"
                                " and no model.safetensors.index.json says which to use"
                            )
                        info = reader.get_slice(name)
                        headers[name] = TensorHeader(tuple(info.get_shape()), _DTYPES[info.get_dtype()], file)
            except (SafetensorError, KeyError) as problem:
                raise MergeInputError(
                    f"model {path}: {file.name} is not a readable safetensors file "
                    f"({type(problem).__name__}: {problem})"
                ) from None
        try:
            config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as problem:  # not JSON, or no model_type transformers knows
            raise MergeInputError(
                f"model {path}: config.json is not a usable model config ({' '.join(str(problem).split())})"
            ) from None
        return cls(model_key(path), config, headers)

    @property
    def nbytes(self) -> int:
        return sum(header.nbytes for header in self.headers.values())

    def load(self, device: torch.device, pin: bool) -> None:
        """Read every tensor once, refusing NaN or Inf: a single one would poison every merge."""
        by_file: dict[Path, list[str]] = {}
        for name, header in self.headers.items():
            by_file.setdefault(header.file, []).append(name)
        tensors = {}  # kept only once all are read: a half-loaded parent would pass for a loaded one
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as reader:
                for name in names:
                    tensor = reader.get_tensor(name)
                    if not finite(tensor):
                        raise ParentError(f"model {self.key}: tensor {name} contains NaN or Inf")
                    tensor = tensor.pin_memory() if pin else tensor
                    tensors[name] = tensor.to(device)
        self.tensors = tensors


def _weight_files(folder: Path, path: str | Path) -> dict[Path, list[str] | None]:
    """Each weights file of ``folder`` with the tensors to read from it (None: all), as mergekit
    finds them: the shards that model.safetensors.index.json maps, else model.safetensors, else
    (beyond mergekit) every other .safetensors file; stray files beside an index or a
    model.safetensors are not read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files: dict[Path, list[str] | None] = {}
            for name, shard in weight_map.items():
                files.setdefault(folder / shard, []).append(name)
        except (ValueError, KeyError, TypeError, AttributeError) as problem:
            raise MergeInputError(
                f"model {path}: {index.name} is not a safetensors index ({type(problem).__name__}: {problem})"
            ) from None
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise MergeInputError(f"model {path}: {index.name} names shards that are not there: {', '.join(missing)}")
        return files
    if (folder / "model.safetensors").is_file():
        return {folder / "model.safetensors": None}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.glob("*.bin")) or ["none"]
        raise MergeInputError(
            f"model {path}: no .safetensors weights (found {', '.join(others)}); weights "
            "load from safetensors only, never from pickled .bin files"
        )
    return dict.fromkeys(files)


class Parents:
    """The parents of a study, resident on the device when they fit, else in (pinned) host memory.

    Streamed parents reach the device tensor by tensor through `prefetch`: on CUDA the copies run on
    a side stream, so the next tensor's transfer overlaps the current tensor's merge.
    """

    def __init__(self, parents: Iterable[Parent], device: str | torch.device = "cpu") -> None:
        self.by_key = {parent.key: parent for parent in parents}
        self.device = torch.device(device)
        self.streamed = False
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def open(cls, paths: Iterable[str | Path], device: str | torch.device = "cpu") -> Parents:
        return cls([Parent.open(path) for path in dict.fromkeys(map(str, paths))], device)

    def __getitem__(self, model: object) -> Parent:
        key = model_key(model)
        if key not in self.by_key:
            raise MergeInputError(
                f"model {model}: not among the loaded parents ({', '.join(sorted(self.by_key)) or 'none'})"
            )
        return self.by_key[key]

    def __iter__(self) -> Iterator[Parent]:
        return iter(self.by_key.values())

    @property
    def nbytes(self) -> int:
        return sum(parent.nbytes for parent in self)

    @property
    def store_device(self) -> torch.device:
        return torch.device("cpu") if self.streamed else self.device

    def load(self, resident: bool = True) -> None:
        """Load every parent: onto the device if `resident`, else into host memory for streaming."""
        self.streamed = not resident
        for parent in self:
            if not parent.tensors:
                parent.load(self.store_device, pin=self.streamed and self.device.type == "cuda")

    def stored(self, model: str, tensor: str) -> torch.Tensor:
        return self.by_key[model].tensors[tensor]

    def prefetch(self, tensors: Iterable[torch.Tensor]) -> Transfer:
        """Start moving stored tensors to the device; resident ones pass through untouched."""
        tensors = list(tensors)
        if not self.streamed:
            return Transfer(tensors, None)
        if self._copy_stream is None:
            return Transfer([tensor.clone() for tensor in tensors], None)
        with torch.cuda.stream(self._copy_stream):
            moved = [tensor.to(self.device, non_blocking=True) for tensor in tensors]
            done = torch.cuda.Event()
            done.record()
        return Transfer(moved, done)


@dataclass
class Transfer:
    """Tensors on their way to the device; `wait` makes the compute stream wait for them."""

    tensors: list[torch.Tensor]
    done: torch.cuda.Event | None

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors)

    def wait(self) -> list[torch.Tensor]:
        if self.done is not None:
            stream = torch.cuda.current_stream(self.tensors[0].device)
            stream.wait_event(self.done)
            for tensor in self.tensors:
                tensor.record_stream(stream)
        return self.tensors
