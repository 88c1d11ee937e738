"""Write torch's zip checkpoint format (what ``torch.save`` writes) for a flat ``{name: tensor}`` dict, streaming.

``torch.save`` needs every tensor in memory when it is called. Here the pickle is written first from the names,
dtypes and shapes alone (known from a plan before any tensor is computed), then each tensor's bytes are appended as
its own record, one tensor at a time. The file is what ``torch.save`` writes for such a dict: a zip archive of
stored (uncompressed) records under ``archive/``: ``data.pkl`` (protocol 2: a dict of
``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())`` whose storages are persistent
ids ``('storage', torch.<Type>Storage, key, 'cpu', numel)``), ``.format_version``, ``.storage_alignment``,
``byteorder``, ``data/<key>`` (each tensor's bytes, the record's data aligned to 64 bytes, as torch aligns them so
that ``torch.load(mmap=True)`` maps them in place) and ``version``. Only the globals that
``torch.load(weights_only=True)`` allows are referenced: the file holds data, never code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import torch

ALIGNMENT = 64
ARCHIVE = "archive"
_CHUNK = 64 << 20

# dtype -> the legacy storage class torch's pickles name (``torch.<name>``)
STORAGE_NAMES = {
    torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
}


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as torch's rebuild call for a contiguous tensor of ``shape`` over storage ``key``."""

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]):
        numel = 1
        for s in shape:
            numel *= int(s)
        self.storage = _Storage(key, dtype, numel)
        self.shape = tuple(int(s) for s in shape)

    def __reduce__(self):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= max(s, 1)
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, STORAGE_NAMES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def _pickle(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump({name: _Tensor(str(i), dtype, shape) for i, (name, dtype, shape) in
                                   enumerate(specs)})
    return buf.getvalue()


def _open_record(zf: zipfile.ZipFile, name: str, size: int):
    """A stored record whose data starts at a multiple of :data:`ALIGNMENT` (padding in the local header's extra
    field, as torch's writer pads)."""
    zi = zipfile.ZipInfo(f"{ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    zi.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    start = zf.fp.tell()
    header = 30 + len(zi.filename.encode("ascii")) + 4 + (20 if zip64 else 0)
    pad = (-(start + header)) % ALIGNMENT
    zi.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    return zf.open(zi, "w", force_zip64=zip64)


def _write_record(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    with _open_record(zf, name, len(data)) as f:
        f.write(data)


def save_tensors(path: str | Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write ``{name: tensor}`` to ``path`` in torch's format. ``specs``: ``(name, dtype, shape)`` of every tensor, in
    order; ``tensors`` yields ``(name, tensor)`` in the same order, one at a time (each is written and released
    before the next is asked for). A tensor that does not match its spec, a missing or extra one, raises
    ``ValueError`` (the caller's temporary file is then discarded)."""
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise ValueError("writing torch checkpoints on a big-endian machine is not supported")
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("a tensor name appears twice")
    for name, dtype, _ in specs:
        if dtype not in STORAGE_NAMES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_record(zf, "data.pkl", _pickle(specs))
        _write_record(zf, ".format_version", b"1")
        _write_record(zf, ".storage_alignment", str(ALIGNMENT).encode())
        _write_record(zf, "byteorder", b"little")
        it = iter(tensors)
        for i, (name, dtype, shape) in enumerate(specs):
            got = next(it, None)
            if got is None:
                raise ValueError(f"{name}: no tensor given")
            gname, t = got
            if gname != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"expected {name} {dtype} {tuple(shape)}, got {gname} {t.dtype} {tuple(t.shape)}")
            flat = t.detach().reshape(-1).contiguous().cpu()
            raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
            data = memoryview(raw.numpy())
            with _open_record(zf, f"data/{i}", len(data)) as f:
                for j in range(0, len(data), _CHUNK):
                    f.write(data[j:j + _CHUNK])
            del flat, raw, data, t, got
        if next(it, None) is not None:
            raise ValueError("more tensors given than specified")
        _write_record(zf, "version", b"3\n")


__all__ = ["ALIGNMENT", "STORAGE_NAMES", "save_tensors"]
