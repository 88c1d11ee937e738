"""DeepSpeed ZeRO-3 checkpoint folders, read directly: each parameter gathered from the ranks' partitions.

Layout (what ``engine.save_checkpoint`` writes under ZeRO-3, one pair of files per data-parallel rank ``r``):

- ``zero_pp_rank_{r}_mp_rank_00_model_states.pt``: ``module`` (the module's state dict: every parameter an empty
  placeholder, persistent buffers whole), ``buffer_names``, ``param_shapes`` (a list, per optimizer parameter
  group, of ``{name: torch.Size}`` in partition order), ``shared_params`` (``{alias: name}``),
  ``frozen_param_shapes`` / ``frozen_param_fragments`` (only when frozen parameters were saved: each rank's
  fragment of each), ``ds_config``, ``ds_version`` and the client state (mmengine's ``meta``, ...);
- ``{bf16_,fp16_,}zero_pp_rank_{r}_mp_rank_00_optim_states.pt``: ``optimizer_state_dict`` with ``zero_stage``,
  ``partition_count`` (the world size) and ``fp32_flat_groups``: per parameter group, one flat fp32 tensor holding
  this rank's partition of every parameter of the group, one after another. A parameter of ``n`` elements has
  ``ceil(n / world)`` elements in every rank's flat group (the last rank's slice ends with zero padding); its full
  value is the concatenation of the ranks' slices, cut to ``n``.

:class:`ZeRO3Source` knows every name, shape and dtype from the rank-0 model states alone; ``load(key)`` reads that
parameter's slice from each rank's optimizer file with ``os.pread`` at the flat group's file offset (the files are
unpickled with ``mmap=True`` and :func:`~maskport.convert.safe_load.safe_torch_load`, never read whole), so memory
holds one parameter at a time. The tensors are exactly those of DeepSpeed's own
``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``: the fp32 master parameters, the buffers
(floating ones as float32, as zero_to_fp32 gives them), the frozen parameters when they were saved, and the shared
parameters' aliases.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import UnreadableFile, UnsupportedCheckpoint
from ..io.safetensors import TensorInfo
from .safe_load import deepspeed_allowlist, is_zip_file, locate_storages, safe_torch_load
from .sources import CAST_CHUNK_BYTES, TensorSource, TrainingCheckpoint, _Files, pread_into, release_pages

__all__ = ["ZeRO3Source", "open_zero3_checkpoint", "is_zero3_folder"]

_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_OPTIM_RE = re.compile(r"^(?:[A-Za-z0-9]+_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def is_zero3_folder(folder: Path) -> bool:
    return any(_MODEL_RE.match(p.name) for p in Path(folder).iterdir())


def _by_rank(folder: Path, rx: re.Pattern, what: str) -> list[Path]:
    found: dict[int, Path] = {}
    for p in folder.iterdir():
        m = rx.match(p.name)
        if not m:
            continue
        if int(m.group(2)) != 0:
            raise UnsupportedCheckpoint(f"{folder}: {p.name} belongs to model-parallel rank {int(m.group(2))}; "
                                        "maskport reads data-parallel ZeRO-3 checkpoints (mp_rank_00) only")
        rank = int(m.group(1))
        if rank in found:
            raise UnreadableFile(f"{folder}: two {what} files for rank {rank} ({found[rank].name}, {p.name})")
        found[rank] = p
    ranks = sorted(found)
    if ranks != list(range(len(ranks))):
        raise UnreadableFile(f"{folder}: {what} files for ranks {ranks}; expected ranks 0..{len(ranks) - 1}")
    return [found[r] for r in ranks]


def _int(v: Any) -> int:
    return int(v) if isinstance(v, int) else -1


class ZeRO3Source(TensorSource):
    """The consolidated tensors of a ZeRO-3 checkpoint folder, each gathered on demand (see the module doc)."""

    def __init__(self, name: str, path: Path, folder: Path, *, allow_unsafe_pickle: bool = False,
                 strip_prefix: str = "module."):
        super().__init__(name, path, f"DeepSpeed ZeRO-3 checkpoint {Path(path).name}")
        self.folder = folder
        self.model_files = _by_rank(folder, _MODEL_RE, "model-states")
        self.optim_files = _by_rank(folder, _OPTIM_RE, "optimizer-states")
        self.world_size = len(self.model_files)
        if not self.optim_files:
            raise UnsupportedCheckpoint(
                f"{folder}: a DeepSpeed ZeRO-3 checkpoint without optimizer-state files (*_optim_states.pt): its "
                "parameters live only there; save with the optimizer states, or pass the consolidated file "
                "(zero_to_fp32 / mmengine's 16-bit state dict)")
        if len(self.optim_files) != self.world_size:
            raise UnreadableFile(f"{folder}: {self.world_size} model-states files but {len(self.optim_files)} "
                                 "optimizer-states files; a rank's files are missing (an interrupted save?)")
        self._files = _Files()
        self._mapped = True
        self.states = [safe_torch_load(f, allow_unsafe_pickle=allow_unsafe_pickle) for f in self.model_files]
        for f, st in zip(self.model_files, self.states):
            if not isinstance(st, dict) or "param_shapes" not in st or not isinstance(st.get("module"), Mapping):
                raise UnreadableFile(f"{f}: not a DeepSpeed ZeRO-3 model-states file (no param_shapes / module)")
        st0 = self.states[0]

        # --- the fp32 flat groups of every rank (memory-mapped, located in their files) -------------------------
        self._groups: list[list[torch.Tensor]] = []
        self._group_offsets: list[list[int | None]] = []
        for f in self.optim_files:
            obj = safe_torch_load(f, allow_unsafe_pickle=allow_unsafe_pickle, extra_globals=deepspeed_allowlist())
            osd = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
            if not isinstance(osd, Mapping) or "fp32_flat_groups" not in osd:
                raise UnreadableFile(f"{f}: not a DeepSpeed ZeRO-3 optimizer-states file (no fp32_flat_groups)")
            stage = _int(osd.get("zero_stage"))
            if stage != 3:
                raise UnreadableFile(f"{f}: ZeRO stage {osd.get('zero_stage')!r}, expected 3")
            count = osd.get("partition_count")
            count = max(count) if isinstance(count, (list, tuple)) else count
            if _int(count) != self.world_size:
                raise UnreadableFile(f"{f}: written by {count} ranks, but the folder holds {self.world_size} ranks' "
                                     "files (an overwritten or partial checkpoint?)")
            groups = list(osd["fp32_flat_groups"])
            if not groups or not all(isinstance(g, torch.Tensor) and g.dim() == 1 for g in groups):
                raise UnreadableFile(f"{f}: fp32_flat_groups is not a list of flat tensors")
            offsets = locate_storages(f, groups) if is_zip_file(f) else {}
            self._groups.append(groups)
            self._group_offsets.append([
                (offsets[g.untyped_storage().data_ptr()] + g.storage_offset() * g.element_size())
                if g.untyped_storage().data_ptr() in offsets else None for g in groups])
        sizes = [g.numel() for g in self._groups[0]]
        for r, groups in enumerate(self._groups):
            if [g.numel() for g in groups] != sizes:
                raise UnreadableFile(f"{self.optim_files[r]}: its flat groups ({[g.numel() for g in groups]}) differ "
                                     f"from rank 0's ({sizes})")
        self._bounds = [0]
        for n in sizes:
            self._bounds.append(self._bounds[-1] + n)

        # --- trainable parameters: (offset in the rank's partition, partition numel, shape) ---------------------
        shapes: dict[str, torch.Size] = {}
        for group in st0["param_shapes"]:
            for k, v in group.items():
                shapes[k] = torch.Size(v)
        self._params: dict[str, tuple[int, int, torch.Size]] = {}
        offset = 0
        for k, shape in shapes.items():
            part = math.ceil(shape.numel() / self.world_size)
            self._params[k] = (offset, part, shape)
            offset += part
        if offset != self._bounds[-1]:
            raise UnreadableFile(f"{self.folder}: the parameter shapes need {offset} elements per rank but the flat "
                                 f"groups hold {self._bounds[-1]} (files of different saves?)")
        dtypes = {g.dtype for g in self._groups[0]}
        self._param_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32

        # --- buffers (whole in rank 0's module), frozen parameters (fragments per rank), shared aliases ------------
        module = st0["module"]
        names = set(st0.get("buffer_names") or ())
        self._buffers = {k: v for k, v in module.items() if k in names and isinstance(v, torch.Tensor)}
        fshapes = st0.get("frozen_param_shapes") or {}
        self._frozen = {k: torch.Size(v) for k, v in fshapes.items()}
        for f, st in zip(self.model_files, self.states):
            frags = st.get("frozen_param_fragments") or {}
            missing = [k for k in self._frozen if not isinstance(frags.get(k), torch.Tensor)]
            if missing:
                raise UnreadableFile(f"{f}: no fragment of frozen parameter {missing[0]}")
        self._shared = {a: n for a, n in (st0.get("shared_params") or {}).items()}

        order: list[str] = [*self._buffers, *self._frozen, *self._params]
        order += [a for a, n in self._shared.items() if n in order and a not in order]
        raw_keys = order
        self._strip = strip_prefix if raw_keys and all(k.startswith(strip_prefix) for k in raw_keys) else ""
        self._keys = [k[len(self._strip):] for k in raw_keys]

    # ------------------------------------------------------------------------------------------------------------
    def _raw(self, key: str) -> str:
        raw = self._strip + key
        return self._shared.get(raw, raw) if raw not in self._params and raw not in self._buffers \
            and raw not in self._frozen else raw

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        if key not in self._keyset():
            raise KeyError(key)
        raw = self._raw(key)
        if raw in self._params:
            return TensorInfo(tuple(self._params[raw][2]), self._param_dtype)
        if raw in self._buffers:
            b = self._buffers[raw]
            return TensorInfo(tuple(b.shape), torch.float32 if b.is_floating_point() else b.dtype)
        frag = self.states[0]["frozen_param_fragments"][raw]
        return TensorInfo(tuple(self._frozen[raw]), frag.dtype)

    def load(self, key: str) -> torch.Tensor:
        if key not in self._keyset():
            raise KeyError(key)
        raw = self._raw(key)
        if raw in self._params:
            return self._gather(raw)  # fresh memory; the writer uses load_into / load_into_as (pooled buffers)
        if raw in self._buffers:
            b = self._buffers[raw]
            out = b.to(torch.float32, copy=True) if b.is_floating_point() else b.clone()
            release_pages(b)
            return out
        frags = [st["frozen_param_fragments"][raw] for st in self.states]
        shape = self._frozen[raw]
        out = torch.cat([f.reshape(-1) for f in frags], 0).narrow(0, 0, shape.numel()).view(shape).clone()
        for f in frags:
            release_pages(f)
        return out

    def _segments(self, raw: str):
        """``(start in the flat value, rank, group, offset in the group, n)`` of every piece of ``raw``'s value
        (padding excluded), in order."""
        offset, part, shape = self._params[raw]
        numel = shape.numel()
        for r in range(self.world_size):
            pos = r * part
            for g, (lo, hi) in enumerate(zip(self._bounds[:-1], self._bounds[1:])):
                start, end = max(lo, offset), min(hi, offset + part)
                if start >= end:
                    continue
                n = min(end - start, numel - pos)
                if n <= 0:
                    return
                yield pos, r, g, start - lo, n
                pos += end - start

    def _read_segment(self, r: int, g: int, goff: int, dest: torch.Tensor) -> None:
        """Rank ``r``'s group ``g`` elements ``[goff, goff + dest.numel())`` into ``dest`` (of the group's dtype)."""
        fofs = self._group_offsets[r][g]
        if fofs is not None:
            pread_into(self._files.fd(self.optim_files[r]), memoryview(dest.view(torch.uint8).numpy()),
                       fofs + goff * dest.element_size(), what=str(self.optim_files[r]))
        else:
            src = self._groups[r][g]
            dest.copy_(src[goff:goff + dest.numel()])
            release_pages(src)

    def _gather(self, raw: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        shape = self._params[raw][2]
        n = shape.numel()
        nbytes = n * self._param_dtype.itemsize
        out = (buffer[:nbytes].view(self._param_dtype) if buffer is not None and n
               else torch.empty(n, dtype=self._param_dtype))
        for pos, r, g, goff, k in self._segments(raw):
            self._read_segment(r, g, goff, out[pos:pos + k])
        return out.view(shape)

    def buffer_nbytes(self, key: str) -> int:
        raw = self._raw(key)
        return self._params[raw][2].numel() * self._param_dtype.itemsize if raw in self._params else 0

    def load_into(self, key: str, buffer: torch.Tensor | None) -> torch.Tensor:
        if key not in self._keyset():
            raise KeyError(key)
        raw = self._raw(key)
        if raw in self._params:
            if buffer is not None and buffer.numel() < self.buffer_nbytes(key):
                raise ValueError(f"load_into needs a buffer of at least {self.buffer_nbytes(key)} bytes")
            return self._gather(raw, buffer)
        return self.load(key)

    def reads_as(self, key: str, dtype: torch.dtype) -> bool:
        return key in self._keyset() and self._raw(key) in self._params

    def load_into_as(self, key: str, dtype: torch.dtype, buffer: torch.Tensor | None) -> torch.Tensor:
        """The parameter converted to ``dtype`` (bit for bit ``load(key).to(dtype)``): its pieces are read a chunk
        of :data:`~maskport.convert.sources.CAST_CHUNK_BYTES` at a time and converted into the output."""
        if not self.reads_as(key, dtype):
            return super().load_into_as(key, dtype, buffer)
        raw = self._raw(key)
        shape = self._params[raw][2]
        n = shape.numel()
        nbytes = n * dtype.itemsize
        if buffer is not None and n:
            if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < nbytes:
                raise ValueError(f"load_into_as needs a 1-D uint8 buffer of at least {nbytes} bytes")
            out = buffer[:nbytes].view(dtype)
        else:
            out = torch.empty(n, dtype=dtype)
        step = max(1, CAST_CHUNK_BYTES // self._param_dtype.itemsize)
        chunk = torch.empty(min(step, max(n, 1)), dtype=self._param_dtype)
        for pos, r, g, goff, k in self._segments(raw):
            for i in range(0, k, step):
                m = min(step, k - i)
                self._read_segment(r, g, goff + i, chunk[:m])
                out[pos + i:pos + i + m].copy_(chunk[:m])
        return out.view(shape)

    def prefetch(self, key: str) -> None:
        pass

    def close(self) -> None:
        self._files.close()


def _dtype_hint(ds_config: Any) -> torch.dtype | None:
    if not isinstance(ds_config, Mapping):
        return None
    for section, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        sec = ds_config.get(section)
        if isinstance(sec, Mapping) and sec.get("enabled") is True:
            return dtype
    return None


def open_zero3_checkpoint(folder: Path, path: Path, *, allow_unsafe_pickle: bool = False) -> TrainingCheckpoint:
    """A :class:`TrainingCheckpoint` over the ZeRO-3 tag folder ``folder`` (``path``: what the user passed)."""
    src = ZeRO3Source("ckpt", path, folder, allow_unsafe_pickle=allow_unsafe_pickle)
    st0 = src.states[0]
    meta = st0.get("meta") if isinstance(st0.get("meta"), dict) else {}
    return TrainingCheckpoint(src, "deepspeed-zero3", meta=meta, files=[*src.model_files, *src.optim_files],
                              dtype_hint=_dtype_hint(st0.get("ds_config")))
