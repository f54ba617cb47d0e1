"""Parent models held in memory for a whole study: configs, tensor headers, and the tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from merge_core.errors import MergeInputError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


def model_key(model: object) -> str:
    """The key a config's model reference and a loaded parent share: the real local path."""
    path = str(model)
    return os.path.realpath(path) if os.path.exists(path) else path


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
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise MergeInputError(f"model {path}: no config.json there (missing parent?)")
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise MergeInputError(f"model {path}: no .safetensors weights found")
        headers = {}
        for file in files:
            with open(file, "rb") as stream:
                size = int.from_bytes(stream.read(8), "little")
                meta = json.loads(stream.read(size))
            for name, info in meta.items():
                if name != "__metadata__":
                    headers[name] = TensorHeader(tuple(info["shape"]), _DTYPES[info["dtype"]], file)
        return cls(model_key(path), AutoConfig.from_pretrained(folder), headers)

    @property
    def nbytes(self) -> int:
        return sum(header.nbytes for header in self.headers.values())

    def load(self, device: torch.device, pin: bool) -> None:
        """Read every tensor once, refusing NaN or Inf: a single one would poison every merge."""
        by_file: dict[Path, list[str]] = {}
        for name, header in self.headers.items():
            by_file.setdefault(header.file, []).append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as reader:
                for name in names:
                    tensor = reader.get_tensor(name)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise MergeInputError(f"model {self.key}: tensor {name} contains NaN or Inf")
                    tensor = tensor.pin_memory() if pin else tensor
                    self.tensors[name] = tensor.to(device)


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
            raise MergeInputError(f"model {model}: not among the loaded parents "
                                  f"({', '.join(sorted(self.by_key)) or 'none'})")
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
