"""Lazy tensor sources: names, shapes and dtypes first; data on demand.

Every reader returns a :class:`TensorSource`. Planning only calls :meth:`TensorSource.info`; the writer
calls :meth:`TensorSource.load` for one group of tensors at a time. Torch pickles are memory-mapped and
safetensors files are opened with ``safe_open``, so neither reads tensor data before it is asked for.

Readers:
- :func:`open_training_checkpoint`: an mmengine ``iter_N.pth`` file, or a DeepSpeed ZeRO-1/2 directory;
- :func:`open_hf_folder`: a HuggingFace model folder (sharded or single safetensors; ``.bin`` with
  ``weights_only``);
- :func:`open_sam2_checkpoint`: Meta's SAM2 ``.pt`` (``{'model': state_dict}``) or a safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import MissingInput, UnreadableFile, UnsupportedCheckpoint
from .safe_load import safe_torch_load

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


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


class SafetensorsSource(TensorSource):
    """Tensors spread over one or more safetensors files, opened lazily with ``safe_open``."""

    def __init__(self, name: str, path: Path, key_to_file: Mapping[str, Path], description: str):
        super().__init__(name, path, description)
        from safetensors import safe_open

        self._safe_open = safe_open
        self._key_to_file = dict(key_to_file)
        self._handles: dict[Path, Any] = {}
        self._infos: dict[str, TensorInfo] = {}
        for file in sorted(set(self._key_to_file.values())):
            h = self._handle(file)
            for k in h.keys():
                if self._key_to_file.get(k) != file:
                    continue
                sl = h.get_slice(k)
                dt = sl.get_dtype()
                if dt not in _ST_DTYPES:
                    raise UnreadableFile(f"{file}: tensor {k} has unsupported dtype {dt}")
                self._infos[k] = TensorInfo(tuple(sl.get_shape()), _ST_DTYPES[dt])
        missing = set(self._key_to_file) - set(self._infos)
        if missing:
            raise UnreadableFile(
                f"{path}: the index lists {len(missing)} tensor(s) that its shards do not contain, "
                f"e.g. {sorted(missing)[0]}"
            )

    def _handle(self, file: Path):
        h = self._handles.get(file)
        if h is None:
            try:
                h = self._safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - re-raised typed
                raise UnreadableFile(f"{file}: not a readable safetensors file ({exc})") from exc
            self._handles[file] = h
        return h

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def load(self, key: str) -> torch.Tensor:
        return self._handle(self._key_to_file[key]).get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


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

    def close(self) -> None:
        self.inner.close()


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingCheckpoint:
    """A training checkpoint: its trainable-subset tensors plus the plain-data metadata that came with it."""

    source: TensorSource
    format: str  # "mmengine" | "deepspeed-zero2"
    meta: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # the files whose bytes hold the weights (for sha256)

    def sha256(self) -> str:
        if len(self.files) == 1:
            return sha256_file(self.files[0])
        h = hashlib.sha256()
        for f in self.files:
            h.update(sha256_file(f).encode())
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
    if path.is_dir():
        ds = _find_deepspeed_dir(path)
        model_file = ds / _DS_MODEL_FILE
        zero3 = sorted(p.name for p in ds.iterdir() if _ZERO3_RE.match(p.name))
        if zero3 and not model_file.exists():
            raise UnsupportedCheckpoint(
                f"{path}: a DeepSpeed ZeRO-3 checkpoint ({zero3[0]}, ...): its weights are partitioned across "
                "ranks, which maskport does not gather yet. Consolidate it first with DeepSpeed's "
                "zero_to_fp32.py and pass the resulting file."
            )
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
        src = StateDictSource("ckpt", path, module, f"DeepSpeed ZeRO-{stage or '1/2'} checkpoint {path.name}")
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
    return TrainingCheckpoint(StateDictSource("ckpt", path, sd, f"{fmt} checkpoint {path.name}"), fmt, meta, [path])


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
        try:
            wm = json.loads(st_index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise UnreadableFile(f"{st_index}: not a safetensors index ({exc})") from exc
        files = {k: path / f for k, f in wm.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise UnreadableFile(f"{st_index} names shard {f.name}, which is missing")
        return SafetensorsSource(name, path, files, f"HF folder {path.name}")
    if st_single.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(st_single), framework="pt") as h:
                keys = list(h.keys())
        except Exception as exc:  # noqa: BLE001
            raise UnreadableFile(f"{st_single}: not a readable safetensors file ({exc})") from exc
        return SafetensorsSource(name, path, {k: st_single for k in keys}, f"HF folder {path.name}")
    bin_index = path / "pytorch_model.bin.index.json"
    bins: list[Path]
    if bin_index.is_file():
        bins = sorted({path / f for f in json.loads(bin_index.read_text())["weight_map"].values()})
    elif (path / "pytorch_model.bin").is_file():
        bins = [path / "pytorch_model.bin"]
    else:
        raise UnreadableFile(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in it")
    merged: dict[str, torch.Tensor] = {}
    for b in bins:
        merged.update(safe_torch_load(b, allow_unsafe_pickle=allow_unsafe_pickle))
    return StateDictSource(name, path, merged, f"HF folder {path.name} (.bin)")


def open_sam2_checkpoint(path: str | Path, *, allow_unsafe_pickle: bool = False) -> TensorSource:
    """Open Meta's SAM2 checkpoint (``{'model': {...}}`` as in ``sam2_hiera_large.pt``) or a safetensors file."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"SAM2 checkpoint {path} does not exist")
    if path.is_dir():
        raise UnreadableFile(f"{path}: a folder; expected Meta's SAM2 checkpoint file (e.g. sam2_hiera_large.pt)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as h:
            keys = list(h.keys())
        return SafetensorsSource("sam2", path, {k: path for k in keys}, f"SAM2 {path.name}")
    obj = safe_torch_load(path, allow_unsafe_pickle=allow_unsafe_pickle)
    if isinstance(obj, dict) and isinstance(obj.get("model"), Mapping):
        sd = obj["model"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        raise UnreadableFile(f"{path}: not a SAM2 checkpoint (expected a dict with a 'model' state dict)")
    return StateDictSource("sam2", path, sd, f"SAM2 {path.name}")


def iter_keys_matching(source: TensorSource, prefixes: Iterable[str]) -> list[str]:
    pf = tuple(prefixes)
    return [k for k in source.keys() if k.startswith(pf)]
