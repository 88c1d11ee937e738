"""Load torch pickles (``.pth``/``.pt``/``.bin``) without executing arbitrary code.

Training checkpoints written by mmengine carry more than tensors: ``message_hub`` holds mmengine
``HistoryBuffer`` objects and numpy arrays/scalars. ``torch.load(weights_only=True)`` refuses them, and
mmengine's own loader fails the same way on torch >= 2.6. We never need those objects' behaviour, only
the tensors and the plain-data ``meta``, so:

1. ``HistoryBuffer`` is replaced by an inert stub class that only stores its pickled state;
2. numpy's reconstruction helpers, ``ndarray``, ``dtype`` and scalar types are allowlisted under both the
   numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) module names;
3. everything else goes through torch's restricted unpickler; a global outside the allowlist raises
   :class:`~maskport.errors.UnsafeCheckpoint` naming it.

Full pickle (which runs whatever code the file names) is only available through
``allow_unsafe_pickle=True`` (CLI: ``--allow-unsafe-pickle``), and says so loudly on stderr.
"""

from __future__ import annotations

import mmap
import pickle
import re
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import UnreadableFile, UnsafeCheckpoint


class HistoryBufferStub:
    """Inert stand-in for ``mmengine.logging.HistoryBuffer``: keeps the pickled state as data."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return "HistoryBufferStub(...)"


def _history_buffer_getattr(obj: Any, name: str) -> str:
    """mmengine pickles HistoryBuffer's statistics methods as ``getattr(HistoryBuffer, 'mean')``. Only that
    form is accepted (on our inert stub class or its instances), and it yields the method's name, not a
    callable."""
    if not (obj is HistoryBufferStub or isinstance(obj, HistoryBufferStub)) or not isinstance(name, str):
        raise pickle.UnpicklingError("getattr is only allowed on mmengine HistoryBuffer objects")
    return f"<HistoryBuffer.{name}>"


class DeepSpeedZeroStageStub(int):
    """Inert stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (an ``int`` enum): the stage number."""

    def __new__(cls, value: Any = 0):
        if not isinstance(value, int):
            raise pickle.UnpicklingError("ZeroStageEnum holds a non-integer value")
        return int.__new__(cls, value)


class DeepSpeedLossScalerStub:
    """Inert stand-in for DeepSpeed's ``LossScaler`` / ``DynamicLossScaler``: keeps the pickled state as data."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


def deepspeed_allowlist() -> list:
    """The DeepSpeed objects its ZeRO optimizer-state files (``*_optim_states.pt``) pickle, each replaced by an
    inert stub (nothing of DeepSpeed is imported or run): the ZeRO stage enum and the fp16/bf16 loss scaler.
    Only the readers of those files pass it to :func:`safe_torch_load`."""
    return [
        (DeepSpeedZeroStageStub, "deepspeed.runtime.zero.config.ZeroStageEnum"),
        (DeepSpeedLossScalerStub, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
        (DeepSpeedLossScalerStub, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    ]


def _numpy_allowlist() -> list:
    import numpy as np

    try:
        from numpy._core import multiarray as _ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma

    entries: list = []
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append((_ma._reconstruct, f"{mod}._reconstruct"))
        entries.append((_ma.scalar, f"{mod}.scalar"))
    entries += [np.ndarray, np.dtype]
    # dtype classes (numpy >= 1.25 pickles some dtypes through numpy.dtypes.*DType)
    for name in dir(np.dtypes):
        obj = getattr(np.dtypes, name)
        if isinstance(obj, type) and name.endswith("DType"):
            entries.append((obj, f"numpy.dtypes.{name}"))
    return entries


def allowlist() -> list:
    """The globals that :func:`safe_torch_load` lets a pickle name (besides torch's own defaults)."""
    return [
        (HistoryBufferStub, "mmengine.logging.history_buffer.HistoryBuffer"),
        (_history_buffer_getattr, "builtins.getattr"),
        (_history_buffer_getattr, "__builtin__.getattr"),
        *_numpy_allowlist(),
    ]


def is_zip_file(path: str | Path) -> bool:
    """Whether ``path`` is in torch's zip format (which :func:`safe_torch_load` memory-maps)."""
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001 - is_zipfile itself raises BadZipFile for some corrupt end records
        return False


_is_zip = is_zip_file


def safe_torch_load(path: str | Path, *, mmap: bool = True, allow_unsafe_pickle: bool = False,
                    extra_globals: Iterable = ()) -> Any:
    """Load a torch pickle with ``weights_only=True`` and the allowlist above.

    Steps:
    1. check the file exists and is readable;
    2. memory-map it when it is in torch's zip format (tensors are then read on demand, not at load);
    3. unpickle with torch's restricted unpickler; a refused global becomes :class:`UnsafeCheckpoint`.

    Args:
        path: the file.
        mmap: memory-map tensor storages (only for zip-format files; legacy files are read whole).
        allow_unsafe_pickle: unpickle with full pickle. This executes any code the file names: only for
            files you trust. A warning is printed on stderr every time.
        extra_globals: more allowlist entries for this file only (e.g. :func:`deepspeed_allowlist` for
            DeepSpeed's optimizer-state files).
    """
    extra_globals = list(extra_globals)
    path = Path(path)
    if not path.is_file():
        raise UnreadableFile(f"{path}: not a file")
    use_mmap = mmap and _is_zip(path)
    if allow_unsafe_pickle:
        print(
            f"WARNING: --allow-unsafe-pickle: unpickling {path} with FULL pickle; "
            "this runs any code the file contains. Use only on files you trust.",
            file=sys.stderr,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap)  # deliberate opt-in
        except Exception as exc:  # noqa: BLE001 - re-raised typed
            raise UnreadableFile(f"{path}: cannot be unpickled even with full pickle: {exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core aliases
            with torch.serialization.safe_globals(allowlist() + extra_globals):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        detail = _unpickler_detail(msg)
        if "GLOBAL" in msg or "global" in detail or "getattr is only allowed" in msg:
            unsafe = _unsafe_globals(path, extra_globals)
            names = ", ".join(unsafe) if unsafe else detail
            raise UnsafeCheckpoint(
                f"{path}: refusing to unpickle objects outside the allowlist ({names}). "
                "If you trust this file, rerun with --allow-unsafe-pickle (runs code from the file)."
            ) from exc
        raise UnreadableFile(f"{path}: not a readable torch checkpoint ({detail})") from exc
    except Exception as exc:  # noqa: BLE001
        # a truncated or crafted pickle fails inside torch's weights-only unpickler in many ways (IndexError: pop
        # from empty list for a 3-byte pickle, struct.error for a cut opcode argument, ...); that unpickler never
        # runs code from the file, so every one of them is an unreadable file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableFile(f"{path}: not a readable torch checkpoint ({first})") from exc


def _unpickler_detail(msg: str) -> str:
    """The informative line of torch's long weights_only error message."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("WeightsUnpickler error:"):
            rest = ln[len("WeightsUnpickler error:"):].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "")
    return lines[0] if lines else "unpickling failed"


def _unsafe_globals(path: Path, extra: list = ()) -> list[str]:
    allowed = {e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}"
               for e in allowlist() + list(extra)}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - best effort for the message only
        return []
    return sorted(g for g in found if g not in allowed)


# --------------------------------------------------------------------------------------------------
# Where the tensor bytes of a zip-format torch file are
# --------------------------------------------------------------------------------------------------

_DATA_RECORD = re.compile(r"^[^/]+/data/[^/]+$")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header (30 bytes)


def zip_data_records(path: str | Path) -> dict[str, tuple[int, int]]:
    """``{record name: (file offset of its first byte, size)}`` for the tensor-storage records
    (``<archive>/data/<key>``) of a zip-format torch file.

    torch writes these records uncompressed (``ZIP_STORED``), so their bytes sit in the file as they are in
    memory. Compressed records (some other writer) are left out: their bytes cannot be read in place. The data
    offset comes from each record's own local header (its extra field may differ from the central directory's).
    """
    out: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if not _DATA_RECORD.match(info.filename) or info.compress_type != zipfile.ZIP_STORED:
                continue
            if info.compress_size != info.file_size:
                continue
            f.seek(info.header_offset)
            raw = f.read(_LOCAL_HEADER.size)
            if len(raw) != _LOCAL_HEADER.size:
                continue
            sig, *_rest, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
            if sig != b"PK\x03\x04":
                continue
            out[info.filename] = (info.header_offset + _LOCAL_HEADER.size + name_len + extra_len, info.file_size)
    return out


def _storage_of(t: Any):
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != "cpu":
        return None
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
        return None


def locate_storages(path: str | Path, tensors: Iterable[Any]) -> dict[int, int]:
    """For tensors unpickled from ``path`` by ``torch.load(mmap=True)``: ``{storage data_ptr: file offset}``.

    ``torch.load(mmap=True)`` maps the whole file once and gives every storage the slice of that mapping which
    holds its record, so ``data_ptr - file offset`` is the same (page-aligned) base for every storage. The base
    is accepted only if it is the single one under which *every* storage starts exactly at a data record of
    the same size; then a few storages are compared byte for byte through both routes. Anything else (a legacy
    file, another torch layout, compressed records) gives ``{}``: the caller then reads through the mapping.
    Reading at the offsets (``os.pread``) leaves the mapping untouched, so the process does not accumulate the
    file's pages in its resident set.
    """
    path = Path(path)
    storages: dict[int, int] = {}
    for t in tensors:
        s = _storage_of(t)
        if s is not None and s[1] > 0:
            storages[s[0]] = max(storages.get(s[0], 0), s[1])
    if not storages:
        return {}
    try:
        records = zip_data_records(path)
    except (OSError, zipfile.BadZipFile):
        return {}
    by_offset = {off: size for off, size in records.values()}
    p0 = min(storages)
    bases = []
    for off, size in by_offset.items():
        base = p0 - off
        if size != storages[p0] or base % mmap.PAGESIZE:
            continue
        if all(by_offset.get(p - base) == n for p, n in storages.items()):
            bases.append(base)
    if len(bases) != 1:
        return {}
    base = bases[0]
    located = {p: p - base for p in storages}
    if not _spot_check(path, located, storages):
        return {}
    return located


def _spot_check(path: Path, located: dict[int, int], sizes: dict[int, int], n: int = 4, nbytes: int = 64) -> bool:
    """Compare the first bytes of a few storages read at their offsets with the same bytes seen through the
    mapping (touching one page of each)."""
    import ctypes

    picks = sorted(located, key=lambda p: -sizes[p])[:n]
    with open(path, "rb") as f:
        for p in picks:
            k = min(nbytes, sizes[p])
            f.seek(located[p])
            if f.read(k) != ctypes.string_at(p, k):
                return False
    return True
