"""Lazy tensor sources: names, shapes and dtypes first; data on demand.

Every reader returns a :class:`TensorSource`. Planning only calls :meth:`TensorSource.info`; the writer
calls :meth:`TensorSource.load` (or :meth:`TensorSource.load_into`, which reuses the caller's buffer) for one
group of tensors at a time.

How bytes are read: safetensors headers are parsed (:func:`maskport.io.safetensors.read_safetensors_header`) and
each tensor is read with ``os.pread`` at its offset; torch zip files are unpickled with
``torch.load(weights_only=True, mmap=True)`` (names, shapes, dtypes, strides, nothing read), and each tensor is
then read with ``os.pread`` at its storage record's offset (:func:`~maskport.convert.safe_load.locate_storages`).
Neither path touches a memory mapping of the file, so the pages of a 10 GB input never count towards the process's
resident set (a mapping's touched pages do, as ``RssFile``, for as long as it stays mapped); they only pass through
the kernel's page cache. Tensors that cannot be located fall back to the mapping, and the pages they touched are
given back after the copy.

Readers:
- :func:`open_training_checkpoint`: an mmengine ``iter_N.pth`` file, a DeepSpeed ZeRO-1/2 directory, a ZeRO-3
  directory (:mod:`maskport.convert.deepspeed`), or what DeepSpeed's ``zero_to_fp32`` wrote (a state-dict file,
  or a folder of ``pytorch_model*.bin`` / ``model*.safetensors`` shards with their index);
- :func:`open_hf_folder`: a HuggingFace model folder (sharded or single safetensors; ``.bin`` with
  ``weights_only``);
- :func:`open_state_dict_file`: one checkpoint file (a state dict, plain or under ``'model'``, or safetensors),
  the mask heads open their checkpoints with it and name them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import MissingInput, UnreadableFile, UnsupportedCheckpoint
from ..io.shards import read_weight_map
from ..io.safetensors import HEADER_MAX, ST_DTYPES, StEntry, TensorInfo, read_safetensors_header
from .safe_load import is_zip_file, locate_storages, safe_torch_load

# the safetensors dtype table, header reader and TensorInfo live in maskport.io.safetensors; the names stay
# importable from here
_ST_DTYPES = ST_DTYPES
_ST_HEADER_MAX = HEADER_MAX
_StEntry = StEntry


class TensorSource:
    """A named, read-only collection of tensors. Subclasses implement ``_info`` and ``_load``."""

    def __init__(self, name: str, path: Path, description: str):
        self.name = name
        self.path = Path(path)
        self.description = description

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def load(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def buffer_nbytes(self, key: str) -> int:
        """Bytes :meth:`load_into` writes into its buffer for ``key``; 0 if this source does not use buffers."""
        return 0

    def load_into(self, key: str, buffer: torch.Tensor | None) -> torch.Tensor:
        """Like :meth:`load`, but a file-backed source puts the bytes into ``buffer`` (a 1-D ``uint8`` tensor of
        at least :meth:`buffer_nbytes` bytes) and returns a view of it, so a caller that reuses buffers does
        not pay for fresh memory at every tensor. The result is only valid until the buffer is reused."""
        return self.load(key)

    def reads_as(self, key: str, dtype: torch.dtype) -> bool:
        """Whether :meth:`load_into_as` converts ``key`` to ``dtype`` while reading it, a bounded chunk
        (:data:`CAST_CHUNK_BYTES`) at a time, so the tensor never exists whole in its stored dtype (a ZeRO-3 fp32
        master written as bf16 then needs only the bf16 bytes). ``False`` by default."""
        return False

    def load_into_as(self, key: str, dtype: torch.dtype, buffer: torch.Tensor | None) -> torch.Tensor:
        """``load(key).to(dtype)`` (the same bits), built in ``buffer`` (a 1-D ``uint8`` tensor of at least the
        converted tensor's bytes; ``None``: fresh memory). Sources for which :meth:`reads_as` is true do it a chunk
        at a time; this default loads the whole tensor first."""
        info = self.info(key)
        n = math.prod(info.shape) * _element_size(dtype)
        out = _buffer_view(buffer, n).view(dtype).view(info.shape) if n else torch.empty(info.shape, dtype=dtype)
        return out.copy_(self.load(key))

    def prefetch(self, key: str) -> None:
        """Hint that ``key`` will be read soon (file-backed sources ask the kernel to read ahead)."""

    def file_span(self, key: str) -> tuple[int, int, int] | None:
        """``(fd, offset, nbytes)`` when ``key``'s bytes lie in one file exactly as :meth:`load` returns them: a
        contiguous row-major tensor of :meth:`info`'s dtype and shape, ``nbytes`` long at ``offset`` of the open,
        read-only ``fd`` (owned by the source: valid until :meth:`close`). A writer can then copy them file to file
        without loading them. ``None`` when that is not so (the default)."""
        return None

    def __contains__(self, key: str) -> bool:
        return key in self._keyset()

    def _keyset(self) -> set[str]:
        ks = getattr(self, "_keyset_cache", None)
        if ks is None:
            ks = set(self.keys())
            self._keyset_cache = ks
        return ks

    def close(self) -> None:  # pragma: no cover - default no-op
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.description} ({len(self.keys())} tensors)>"


class StateDictSource(TensorSource):
    """Tensors of an already unpickled (memory-mapped) state dict."""

    def __init__(self, name: str, path: Path, tensors: Mapping[str, Any], description: str):
        super().__init__(name, path, description)
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        self.non_tensors = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(tuple(t.shape), t.dtype)

    def load(self, key: str) -> torch.Tensor:
        return self._tensors[key]


CAST_CHUNK_BYTES = 16 << 20  # stored-dtype bytes a source converting while it reads holds at a time (reads_as)
_MAX_READ = 1 << 30  # bytes per pread call (Linux caps one read at 2 GiB - 4 KiB)


def pread_into(fd: int, buf: memoryview, offset: int, *, what: str = "file") -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (positional: no shared file position, safe across threads)."""
    pos = 0
    n = len(buf)
    while pos < n:
        view = buf[pos:pos + _MAX_READ]
        got = os.preadv(fd, [view], offset + pos) if hasattr(os, "preadv") else _pread_fallback(fd, view, offset + pos)
        if got <= 0:
            raise UnreadableFile(f"{what}: unexpected end of file at byte {offset + pos} (truncated?)")
        pos += got


def _pread_fallback(fd: int, view: memoryview, offset: int) -> int:  # pragma: no cover - platforms without preadv
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


def _fadvise_willneed(fd: int, offset: int, nbytes: int) -> None:
    if hasattr(os, "posix_fadvise") and nbytes > 0:
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # pragma: no cover - advisory only
            pass


class _Files:
    """Read-only file descriptors, opened on first use and shared by the threads of one conversion."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._fds[path] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _span_elements(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements of storage a strided tensor spans (from its first element to its last, inclusive)."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


def _as_tensor(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """View ``raw`` (uint8, exactly the spanned bytes) as a ``dtype`` tensor of ``shape``/``stride``."""
    flat = raw.view(dtype) if raw.numel() else torch.empty(0, dtype=dtype)
    return flat.as_strided(shape, stride, 0)


def _buffer_view(buffer: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    if buffer is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < nbytes or not buffer.is_contiguous():
        raise ValueError(f"load_into needs a contiguous 1-D uint8 buffer of at least {nbytes} bytes")
    return buffer[:nbytes]


_MADV_DONTNEED = 4


def release_pages(t: torch.Tensor) -> None:
    """Give back the pages of a file mapping that ``t``'s storage touched (Linux ``madvise(MADV_DONTNEED)`` on the
    whole pages inside the storage). Safe for read-only, private file mappings: a later access reads the file
    again. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import mmap

        st = t.untyped_storage()
        start, n = st.data_ptr(), st.nbytes()
        page = mmap.PAGESIZE
        lo = -(-start // page) * page
        hi = (start + n) // page * page
        if hi > lo:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_DONTNEED))
    except Exception:  # noqa: BLE001 - best effort
        pass


class TorchFileSource(StateDictSource):
    """Tensors of torch zip file(s) unpickled with ``mmap=True``; their bytes are read with ``os.pread`` at the
    storage records' offsets instead of through the mapping.

    ``locations``: ``{key: (file, file offset of the storage)}`` for the tensors that could be located; any other
    tensor is copied out of the mapping, whose touched pages are then released (:func:`release_pages`)."""

    def __init__(self, name: str, path: Path, tensors: Mapping[str, Any], description: str,
                 locations: Mapping[str, tuple[Path, int]], *, mapped: bool = False):
        super().__init__(name, path, tensors, description)
        self._locations = {k: v for k, v in locations.items() if k in self._tensors}
        self._mapped = mapped  # the tensors live in a private file mapping (their pages may be released)
        self._files = _Files()

    @staticmethod
    def locate(file: Path, tensors: Mapping[str, Any]) -> dict[str, tuple[Path, int]]:
        """``{key: (file, storage offset)}`` for the tensors of ``tensors`` found in ``file``'s records."""
        offsets = locate_storages(file, (v for v in tensors.values() if isinstance(v, torch.Tensor)))
        out = {}
        for k, v in tensors.items():
            if isinstance(v, torch.Tensor) and v.layout == torch.strided and v.device.type == "cpu":
                ptr = v.untyped_storage().data_ptr()
                if ptr in offsets:
                    out[k] = (Path(file), offsets[ptr])
        return out

    @classmethod
    def from_file(cls, name: str, path: Path, file: Path, tensors: Mapping[str, Any], description: str):
        """A source over ``tensors``, unpickled from ``file`` by :func:`safe_torch_load`."""
        tensors = dict(tensors)
        return cls(name, path, tensors, description, cls.locate(file, tensors), mapped=is_zip_file(file))

    @property
    def located(self) -> int:
        """How many tensors are read at file offsets (the others go through the mapping)."""
        return len(self._locations)

    def _span(self, key: str) -> tuple[Path, int, int] | None:
        loc = self._locations.get(key)
        if loc is None:
            return None
        t = self._tensors[key]
        es = t.element_size()
        return loc[0], loc[1] + t.storage_offset() * es, _span_elements(tuple(t.shape), tuple(t.stride())) * es

    def buffer_nbytes(self, key: str) -> int:
        span = self._span(key)
        if span is None:
            t = self._tensors[key]
            return t.numel() * t.element_size()
        return span[2]

    def load(self, key: str) -> torch.Tensor:
        return self.load_into(key, None)

    def load_into(self, key: str, buffer: torch.Tensor | None) -> torch.Tensor:
        t = self._tensors[key]
        span = self._span(key)
        if span is None:
            out = _buffer_view(buffer, t.numel() * t.element_size()).view(t.dtype).view(t.shape) if t.numel() \
                else torch.empty(t.shape, dtype=t.dtype)
            out.copy_(t)
            if self._mapped:
                release_pages(t)
            return out
        file, offset, nbytes = span
        raw = _buffer_view(buffer, nbytes)
        if nbytes:
            pread_into(self._files.fd(file), memoryview(raw.numpy()), offset, what=str(file))
        return _as_tensor(raw, t.dtype, tuple(t.shape), tuple(t.stride()))

    def prefetch(self, key: str) -> None:
        span = self._span(key)
        if span is not None:
            _fadvise_willneed(self._files.fd(span[0]), span[1], span[2])

    def file_span(self, key: str) -> tuple[int, int, int] | None:
        span = self._span(key)
        if span is None:
            return None
        t = self._tensors[key]
        # the spanned bytes are the tensor's only when it is contiguous (a strided view spans more, or other order)
        if not t.is_contiguous() or span[2] != t.numel() * t.element_size():
            return None
        return self._files.fd(span[0]), span[1], span[2]

    def close(self) -> None:
        self._files.close()


class SafetensorsSource(TensorSource):
    """Tensors spread over one or more safetensors files: headers parsed up front, bytes read with ``os.pread``
    (no memory mapping: see the module docstring)."""

    def __init__(self, name: str, path: Path, key_to_file: Mapping[str, Path], description: str):
        super().__init__(name, path, description)
        self._key_to_file = {k: Path(f) for k, f in key_to_file.items()}
        self._entries: dict[str, _StEntry] = {}
        self._files = _Files()
        for file in sorted(set(self._key_to_file.values())):
            entries, _ = read_safetensors_header(file)
            for k, e in entries.items():
                if self._key_to_file.get(k) == file:
                    self._entries[k] = e
        missing = set(self._key_to_file) - set(self._entries)
        if missing:
            raise UnreadableFile(
                f"{path}: the index lists {len(missing)} tensor(s) that its shards do not contain, "
                f"e.g. {sorted(missing)[0]}"
            )
        self._infos = {k: e.info for k, e in self._entries.items()}

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def buffer_nbytes(self, key: str) -> int:
        return self._infos[key].nbytes

    def load(self, key: str) -> torch.Tensor:
        return self.load_into(key, None)

    def load_into(self, key: str, buffer: torch.Tensor | None) -> torch.Tensor:
        e = self._entries[key]
        raw = _buffer_view(buffer, e.info.nbytes)
        if e.info.nbytes:
            pread_into(self._files.fd(e.file), memoryview(raw.numpy()), e.offset, what=str(e.file))
        return _as_tensor(raw, e.info.dtype, e.info.shape, _contiguous_stride(e.info.shape))

    def prefetch(self, key: str) -> None:
        e = self._entries[key]
        _fadvise_willneed(self._files.fd(e.file), e.offset, e.info.nbytes)

    def file_span(self, key: str) -> tuple[int, int, int] | None:
        e = self._entries[key]
        return self._files.fd(e.file), e.offset, e.info.nbytes

    def close(self) -> None:
        self._files.close()


class RenamedSource(TensorSource):
    """A view of another source under different key names (a bijective renaming, e.g. legacy layouts)."""

    def __init__(self, inner: TensorSource, rename: Mapping[str, str], description: str | None = None):
        super().__init__(inner.name, inner.path, description or inner.description)
        self.inner = inner
        self._to_inner = {new: old for old, new in rename.items()}
        self.original_names = dict(self._to_inner)
        if len(self._to_inner) != len(rename):
            raise ValueError("renaming is not one-to-one")

    def keys(self) -> list[str]:
        return list(self._to_inner)

    def info(self, key: str) -> TensorInfo:
        return self.inner.info(self._to_inner[key])

    def load(self, key: str) -> torch.Tensor:
        return self.inner.load(self._to_inner[key])

    def buffer_nbytes(self, key: str) -> int:
        return self.inner.buffer_nbytes(self._to_inner[key])

    def load_into(self, key: str, buffer: torch.Tensor | None) -> torch.Tensor:
        return self.inner.load_into(self._to_inner[key], buffer)

    def reads_as(self, key: str, dtype: torch.dtype) -> bool:
        return self.inner.reads_as(self._to_inner[key], dtype)

    def load_into_as(self, key: str, dtype: torch.dtype, buffer: torch.Tensor | None) -> torch.Tensor:
        return self.inner.load_into_as(self._to_inner[key], dtype, buffer)

    def prefetch(self, key: str) -> None:
        self.inner.prefetch(self._to_inner[key])

    def file_span(self, key: str) -> tuple[int, int, int] | None:
        return self.inner.file_span(self._to_inner[key])

    def close(self) -> None:
        self.inner.close()


def sha256_file(path: Path, chunk: int = 8 << 20, stop=None) -> str:
    """sha256 of a file, read into one reused buffer (a fresh 16 MB ``bytes`` per read would cost page faults).
    ``stop``: a ``threading.Event``; once set, the next chunk raises ``InterruptedError`` (a background hash is
    stopped before the process exits)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            if stop is not None and stop.is_set():
                raise InterruptedError(f"hashing {path} stopped")
            h.update(view[:n])
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingCheckpoint:
    """A training checkpoint: its trainable-subset tensors plus the plain-data metadata that came with it."""

    source: TensorSource
    format: str  # "mmengine" | "deepspeed" | "deepspeed-zero3" | "zero_to_fp32" | "state-dict"
    meta: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # the files whose bytes hold the weights (for sha256)
    dtype_hint: torch.dtype | None = None  # the training dtype when the tensors are fp32 masters (ZeRO-3)

    def sha256(self, stop=None) -> str:
        if len(self.files) == 1:
            return sha256_file(self.files[0], stop=stop)
        h = hashlib.sha256()
        for f in self.files:
            h.update(sha256_file(f, stop=stop).encode())
        return h.hexdigest()

    @property
    def config_text(self) -> str | None:
        cfg = self.meta.get("cfg") if isinstance(self.meta, dict) else None
        return cfg if isinstance(cfg, str) else None


_DS_MODEL_FILE = "mp_rank_00_model_states.pt"
_ZERO3_RE = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")


def _strip_common_prefix(sd: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _find_deepspeed_dir(path: Path) -> Path:
    """The folder holding the model-states files: ``path`` itself, the tag named by ``latest``, or its only
    subfolder."""
    if any(p.name == _DS_MODEL_FILE or _ZERO3_RE.match(p.name) for p in path.iterdir()):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (path / tag).is_dir():
            return path / tag
    subdirs = [p for p in path.iterdir() if p.is_dir()]
    if len(subdirs) == 1:
        return _find_deepspeed_dir(subdirs[0])
    raise UnreadableFile(
        f"{path}: a folder, but not a DeepSpeed checkpoint (no {_DS_MODEL_FILE} in it or in a tag folder)"
    )


def open_training_checkpoint(path: str | Path, *, allow_unsafe_pickle: bool = False) -> TrainingCheckpoint:
    """Open an mmengine ``.pth`` file or a DeepSpeed ZeRO-1/2 checkpoint directory.

    mmengine files hold ``{'state_dict', 'meta', 'message_hub', ...}``; DeepSpeed directories hold
    ``mp_rank_00_model_states.pt`` whose ``module`` is the 16-bit module state dict (ZeRO-1/2). ZeRO-3
    directories are recognised and refused: their weights are partitioned across ranks.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"training checkpoint {path} does not exist")
    if path.is_file() and (path.suffix == ".safetensors" or path.name.endswith(".index.json")):
        return _open_zero_to_fp32_output(path.parent if path.name.endswith(".index.json") else path, path,
                                         allow_unsafe_pickle=allow_unsafe_pickle)
    if path.is_dir():
        if _is_state_dict_folder(path):
            return _open_zero_to_fp32_output(path, path, allow_unsafe_pickle=allow_unsafe_pickle)
        ds = _find_deepspeed_dir(path)
        model_file = ds / _DS_MODEL_FILE
        zero3 = sorted(p.name for p in ds.iterdir() if _ZERO3_RE.match(p.name))
        if zero3 and not model_file.exists():
            from .deepspeed import open_zero3_checkpoint

            return open_zero3_checkpoint(ds, path, allow_unsafe_pickle=allow_unsafe_pickle)
        obj = safe_torch_load(model_file, allow_unsafe_pickle=allow_unsafe_pickle)
        if not isinstance(obj, dict) or "module" not in obj:
            raise UnreadableFile(f"{model_file}: no 'module' entry; not a DeepSpeed model-states file")
        stage = _ds_zero_stage(obj)
        if stage == 3:
            raise UnsupportedCheckpoint(
                f"{path}: a DeepSpeed ZeRO-3 checkpoint (ds_config zero stage 3); not supported yet. "
                "Consolidate it first with DeepSpeed's zero_to_fp32.py and pass the resulting file."
            )
        module = obj["module"]
        if not isinstance(module, Mapping):
            raise UnreadableFile(f"{model_file}: 'module' is {type(module).__name__}, not a state dict")
        module = _strip_common_prefix(module, "module.")
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        src = TorchFileSource.from_file("ckpt", path, model_file, module,
                                        f"DeepSpeed ZeRO-{stage or '1/2'} checkpoint {path.name}")
        return TrainingCheckpoint(src, "deepspeed", meta=meta, files=[model_file])
    obj = safe_torch_load(path, allow_unsafe_pickle=allow_unsafe_pickle)
    if not isinstance(obj, dict):
        raise UnreadableFile(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
        fmt = "mmengine"
    elif "module" in obj and isinstance(obj["module"], Mapping):
        sd, fmt = obj["module"], "deepspeed"
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, fmt = obj, "state-dict"
    else:
        raise UnreadableFile(
            f"{path}: no 'state_dict' entry and not a plain state dict (top-level keys: {sorted(obj)[:8]})"
        )
    sd = _strip_common_prefix(sd, "module.")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    src = TorchFileSource.from_file("ckpt", path, path, sd, f"{fmt} checkpoint {path.name}")
    return TrainingCheckpoint(src, fmt, meta, [path])


_STATE_DICT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                     "pytorch_model.bin")


def _is_state_dict_folder(path: Path) -> bool:
    """A folder that ``zero_to_fp32`` (``convert_zero_checkpoint_to_fp32_state_dict``) wrote: the HF weight file
    names, and no DeepSpeed model states."""
    return any((path / n).is_file() for n in _STATE_DICT_FILES) and not (path / _DS_MODEL_FILE).exists() \
        and not any(_ZERO3_RE.match(p.name) for p in path.iterdir())


def _open_zero_to_fp32_output(target: Path, path: Path, *, allow_unsafe_pickle: bool = False) -> TrainingCheckpoint:
    """The consolidated state dict DeepSpeed's ``zero_to_fp32`` writes: one ``pytorch_model.bin`` or
    ``model.safetensors``, or shards with their ``*.index.json`` (DeepSpeed > 0.15.2 shards at 5GB by default).
    ``.bin`` files go through the safe loader; no training config comes with them (pass LoRA settings as flags)."""
    if target.is_file():  # a single .safetensors file
        keys = list(read_safetensors_header(target)[0])
        src: TensorSource = SafetensorsSource("ckpt", path, {k: target for k in keys}, f"state dict {target.name}")
        return TrainingCheckpoint(src, "zero_to_fp32", {}, [target])
    src = open_hf_folder(target, name="ckpt", allow_unsafe_pickle=allow_unsafe_pickle)
    src.description = f"zero_to_fp32 output {target.name}"
    files = sorted({p for n in ("model*.safetensors", "pytorch_model*.bin") for p in target.glob(n)})
    return TrainingCheckpoint(src, "zero_to_fp32", {}, files)


def _ds_zero_stage(obj: Mapping) -> int | None:
    cfg = obj.get("ds_config")
    if isinstance(cfg, Mapping):
        zo = cfg.get("zero_optimization")
        if isinstance(zo, Mapping) and isinstance(zo.get("stage"), int):
            return zo["stage"]
    return None


# --------------------------------------------------------------------------------------------------
# HF folders and SAM2
# --------------------------------------------------------------------------------------------------


def open_hf_folder(path: str | Path, *, name: str = "base", allow_unsafe_pickle: bool = False) -> TensorSource:
    """Open the weights of a HuggingFace model folder without reading tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInput(f"base model folder {path} does not exist (or is not a folder)")
    st_index = path / "model.safetensors.index.json"
    st_single = path / "model.safetensors"
    if st_index.is_file():
        wm = read_weight_map(st_index)
        files = {k: path / f for k, f in wm.items()}
        return SafetensorsSource(name, path, files, f"HF folder {path.name}")
    if st_single.is_file():
        keys = list(read_safetensors_header(st_single)[0])
        return SafetensorsSource(name, path, {k: st_single for k in keys}, f"HF folder {path.name}")
    bin_index = path / "pytorch_model.bin.index.json"
    bins: list[Path]
    if bin_index.is_file():
        bins = sorted({path / f for f in read_weight_map(bin_index).values()})
    elif (path / "pytorch_model.bin").is_file():
        bins = [path / "pytorch_model.bin"]
    else:
        raise UnreadableFile(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in it")
    merged: dict[str, torch.Tensor] = {}
    locations: dict[str, tuple[Path, int]] = {}
    for b in bins:
        sd = safe_torch_load(b, allow_unsafe_pickle=allow_unsafe_pickle)
        if not isinstance(sd, Mapping):
            raise UnreadableFile(f"{b}: holds a {type(sd).__name__}, not a state dict")
        merged.update(sd)
        for k in sd:
            locations.pop(k, None)
        locations.update(TorchFileSource.locate(b, sd))
    return TorchFileSource(name, path, merged, f"HF folder {path.name} (.bin)", locations,
                           mapped=all(is_zip_file(b) for b in bins))


def open_state_dict_file(path: str | Path, *, name: str, label: str, example: str = "",
                         allow_unsafe_pickle: bool = False) -> TensorSource:
    """One checkpoint file as a source named ``name``: a safetensors file, or a torch file holding a state dict of
    tensors, plain or under ``'model'``, unpickled with the safe loader.
    ``label`` names the file in messages (the caller's words), ``example`` a file name a user would have.
    Tensor data is read on demand."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{label} {path} does not exist")
    if path.is_dir():
        raise UnreadableFile(f"{path}: a folder; expected a {label} file" + (f" (e.g. {example})" if example else ""))
    short = label.split()[0]
    if path.suffix == ".safetensors":
        keys = list(read_safetensors_header(path)[0])
        return SafetensorsSource(name, path, {k: path for k in keys}, f"{short} {path.name}")
    obj = safe_torch_load(path, allow_unsafe_pickle=allow_unsafe_pickle)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise UnreadableFile(f"{path}: not a {label} (expected a state dict of tensors, or one under 'model')")
    return TorchFileSource.from_file(name, path, path, obj, f"{short} {path.name}")


def iter_keys_matching(source: TensorSource, prefixes: Iterable[str]) -> list[str]:
    pf = tuple(prefixes)
    return [k for k in source.keys() if k.startswith(pf)]
