"""The safetensors format: the dtype table, a header reader and a header builder.

Layout (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length ``N``, ``N``
bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then
the tensors' raw row-major little-endian bytes; ``data_offsets`` count from the first byte after the header.

- :data:`ST_DTYPES` / :data:`ST_DTYPE_NAMES`: the one table of safetensors dtype names <-> torch dtypes, used
  by the reader, the builder, the conversion writer and the quantize writer;
- :func:`read_safetensors_header`: parse and check a file's header (nothing else is read);
- :func:`build_header`: the header bytes (length prefix, JSON, padding) for tensors laid out one after the
  other in the given order; the tensor bytes are then appended in that order by the caller.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UnreadableFile
from .jsonfile import JsonError, loads_bounded

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    **{name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},  # torch >= 2.3
}
"""safetensors dtype name -> torch dtype (the dtypes maskport reads and writes; a file with another dtype is
refused by :func:`read_safetensors_header`)."""

ST_DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in ST_DTYPES.items()}
"""torch dtype -> safetensors dtype name (the inverse of :data:`ST_DTYPES`)."""

MAX_TENSORS = 1_000_000
"""The most tensors one safetensors file may declare (the largest real checkpoints hold tens of thousands)."""

HEADER_MAX = 100 << 20
"""The largest header the reader accepts (the safetensors library's own limit is 100 MB as well)."""


def dtype_size(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or a safetensors dtype name (``KeyError`` for an unknown name)."""
    if isinstance(dtype, str):
        dtype = ST_DTYPES[dtype]
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's shape and dtype, without its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StEntry:
    """Where one tensor of a safetensors file lies."""

    file: Path
    offset: int   # absolute file offset of the first byte
    info: TensorInfo


def read_safetensors_header(file: Path) -> tuple[dict[str, StEntry], dict[str, str]]:
    """Parse a safetensors file's header: ``({name: entry}, metadata)``; raises :class:`UnreadableFile` for
    anything that is not a well-formed safetensors file (bad length, JSON, dtype, shape or offsets, or data past
    the end of the file). Only the header is read."""
    file = Path(file)

    def bad(why: str) -> UnreadableFile:
        return UnreadableFile(f"{file}: not a readable safetensors file ({why})")

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > HEADER_MAX or 8 + n > size:
                raise bad(f"header length {n} does not fit the file size {size}")
            header = loads_bounded(f.read(n), max_bytes=HEADER_MAX, max_depth=4)
    except OSError as exc:
        raise bad(str(exc)) from exc
    except JsonError as exc:
        raise bad(f"header: {exc}") from None
    return parse_header(header, file, 8 + n, size)


def _short(obj: object) -> str:
    r = repr(obj)
    return r if len(r) <= 120 else r[:117] + "..."


def parse_header(header: object, file: Path, data_start: int, size: int) -> tuple[dict[str, StEntry], dict[str, str]]:
    """Check a parsed safetensors header (as the safetensors library does): entries well-formed, dtypes known,
    shapes non-negative ints, each tensor's span exactly its bytes, spans contiguous from byte 0 without overlap
    or gap, covering the data exactly to the end of the file, metadata strings. :class:`UnreadableFile` naming the file and the tensor."""

    def bad(why: str) -> UnreadableFile:
        return UnreadableFile(f"{file}: not a readable safetensors file ({why})")

    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header = dict(header)
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad(f"__metadata__ must map strings to strings, found {_short(metadata)}")
    if len(header) > MAX_TENSORS:
        raise bad(f"{len(header)} tensors, more than the {MAX_TENSORS} accepted")
    entries: dict[str, StEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, e in header.items():
        if not (isinstance(e, dict) and set(e) <= {"dtype", "shape", "data_offsets"}
                and {"dtype", "shape", "data_offsets"} <= set(e)):
            raise bad(f"tensor {name}: malformed entry {_short(e)}")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dt, str) or dt not in ST_DTYPES:
            raise UnreadableFile(f"{file}: tensor {name} has unsupported dtype {dt if isinstance(dt, str) else _short(dt)}")
        if not (isinstance(shape, list) and len(shape) <= 32
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise bad(f"tensor {name}: bad shape {_short(shape)}")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise bad(f"tensor {name}: bad data_offsets {_short(offs)}")
        begin, end = offs
        info = TensorInfo(tuple(shape), ST_DTYPES[dt])
        if not 0 <= begin <= end or end - begin != info.nbytes:
            raise bad(f"tensor {name}: data_offsets {offs} do not hold {info.shape} {dt}")
        if data_start + end > size:
            raise bad(f"tensor {name}: data ends at byte {data_start + end}, past the end of the file (truncated?)")
        spans.append((begin, end, name))
        entries[name] = StEntry(file, data_start + begin, info)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            why = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise bad(f"tensor {name}: data_offsets [{begin}, {end}] {why} (tensor spans must be contiguous and "
                      f"must not overlap)")
        pos = end
    if data_start + pos != size:
        raise bad(f"{size - data_start - pos} bytes after the last tensor's data (the tensors must cover the file "
                  f"exactly, as the safetensors library requires)")
    return entries, metadata


def build_header(tensors: Iterable[tuple[str, TensorInfo]], metadata: Mapping[str, str] | None = None) -> bytes:
    """The first bytes of a safetensors file holding ``tensors`` (``(name, info)``), laid out one after the other
    in the given order with no gaps: the 8-byte length, then compact JSON padded with spaces to a multiple of 8
    bytes (so the data starts aligned). ``metadata`` (str -> str) becomes ``__metadata__`` when given.

    The caller then writes each tensor's ``info.nbytes`` bytes (row-major, little-endian), in the same order.
    ``ValueError`` for a repeated name, a dtype safetensors has no name for, or non-string metadata."""
    h: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata must map strings to strings, got {dict(metadata)!r}")
        h["__metadata__"] = dict(metadata)
    off = 0
    for name, info in tensors:
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved in a safetensors header; it cannot name a tensor")
        if name in h:
            raise ValueError(f"tensor {name!r} appears twice in one safetensors header")
        if info.dtype not in ST_DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {info.dtype} has no safetensors name")
        h[name] = {"dtype": ST_DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                   "data_offsets": [off, off + info.nbytes]}
        off += info.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


__all__ = ["HEADER_MAX", "ST_DTYPES", "ST_DTYPE_NAMES", "StEntry", "TensorInfo", "build_header", "dtype_size",
           "read_safetensors_header"]
