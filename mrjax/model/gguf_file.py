"""A llama.cpp GGUF file's header: its metadata and its tensors (raw bytes, memory-mapped).

The ``gguf`` package's reader makes a numpy view of every string it meets, which takes ~2.4 s on
the embedded default's 49k-token vocabulary and 49k merges, each time a process reads the file;
walking the header with ``struct`` takes ~0.05 s. Dequantising stays ``gguf.quants``'s work.
Layout (little-endian, versions 2 and 3): magic ``GGUF``, version u32, tensor count u64, metadata
count u64; then each metadata entry (key string, value type u32, value); then each tensor's
name, dimension count u32, dimensions u64 (innermost first), type u32 and offset u64 into the data
section, which starts at the next multiple of ``general.alignment`` (32 by default)."""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Metadata value types with a fixed size; 8 is a string (u64 length, UTF-8 bytes), 9 an array
# (element type u32, count u64, elements).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first): the file lists dimensions innermost first
    type: int  # a ggml type (``gguf.GGMLQuantizationType``)
    data: np.ndarray  # its bytes (uint8), a view of the memory-mapped file


class _Header:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            element, count = self.unpack("IQ")
            if element in _SCALARS:
                return list(self.unpack(f"{count}{_SCALARS[element]}"))
            return [self.value(element) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind} at byte {self.pos}")
        return self.unpack(_SCALARS[kind])[0]


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(metadata by key, tensors by name) of a GGUF file. Raises ValueError on what is not one."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ValueError("the file is empty") from None
    header = _Header(buf)
    try:
        magic, version, n_tensors, n_metadata = header.unpack("4sIQQ")
        if magic != b"GGUF":
            raise ValueError(f"no GGUF magic (starts with {magic!r})")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (byte-swapped: big-endian?) is not supported; versions 2 and 3 are")
        metadata = {}
        for _ in range(n_metadata):
            key = header.string()
            metadata[key] = header.value(header.unpack("I")[0])
        infos = []
        for _ in range(n_tensors):
            name = header.string()
            (n_dims,) = header.unpack("I")
            dims = header.unpack(f"{n_dims}Q")
            kind, offset = header.unpack("IQ")
            infos.append((name, tuple(int(d) for d in reversed(dims)), GGMLQuantizationType(kind), offset))
    except struct.error:
        raise ValueError(f"the header ends early (byte {header.pos} of {len(buf)})") from None
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-header.pos // alignment) * alignment
    tensors = {}
    for name, shape, kind, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        size = int(np.prod(shape)) // block * block_bytes
        if start + offset + size > len(buf):
            raise ValueError(f"tensor {name} runs past the end of the file")
        tensors[name] = GGUFTensor(name, shape, kind, np.frombuffer(buf, np.uint8, size, start + offset))
    return metadata, tensors
