"""Sharding: which tensors go into which file, the files' names, and the index that maps the two.

Pure functions (no I/O except :func:`write_index`), following the Hugging Face convention that
``transformers``/``huggingface_hub`` write and read:

- one shard is ``model.safetensors``; ``n > 1`` shards are ``model-00001-of-0000n.safetensors`` ... (5 digits);
- with more than one shard, ``model.safetensors.index.json`` = ``{"metadata": {"total_size": <bytes of tensor
  data>}, "weight_map": {tensor name: shard file name}}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def shard_filenames(count: int) -> list[str]:
    """The file names of ``count`` shards, in order: ``['model.safetensors']`` for one,
    ``['model-00001-of-00003.safetensors', ...]`` for several, ``[]`` for none."""
    if count < 0:
        raise ValueError(f"a shard count cannot be negative: {count}")
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def pack_shards(items: Iterable[T], size_of: Callable[[T], int], max_shard_size: int) -> list[list[T]]:
    """Split ``items`` into groups of at most ``max_shard_size`` bytes (``size_of(item)`` each), greedily in the
    given order: an item starts a new group when adding it to the current one would exceed the limit. An item
    larger than the limit therefore gets a group of its own (one that exceeds the limit). No empty groups; the
    order of the items is kept, within and across groups."""
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    groups: list[list[T]] = []
    cur: list[T] = []
    cur_bytes = 0
    for item in items:
        n = size_of(item)
        if n < 0:
            raise ValueError(f"an item cannot have a negative size ({n})")
        if cur and cur_bytes + n > max_shard_size:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(item)
        cur_bytes += n
    if cur:
        groups.append(cur)
    return groups


def index_json(weight_map: Mapping[str, str], total_size: int) -> str:
    """The text of ``model.safetensors.index.json`` (keys sorted, so equal inputs give equal bytes)."""
    index = {"metadata": {"total_size": int(total_size)}, "weight_map": dict(weight_map)}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def write_index(out_dir: Path, weight_map: Mapping[str, str], total_size: int) -> Path:
    """Write :data:`INDEX_NAME` into ``out_dir``; ``total_size``: bytes of tensor data in all shards (headers
    not counted, as in ``transformers``' own indexes). Returns its path."""
    path = Path(out_dir) / INDEX_NAME
    path.write_text(index_json(weight_map, total_size))
    return path


__all__ = ["INDEX_NAME", "SINGLE_NAME", "index_json", "pack_shards", "shard_filenames", "write_index"]


def read_weight_map(index: Path, *, check_files: bool = True) -> dict[str, str]:
    """``weight_map`` of a ``*.index.json`` (safetensors or .bin) that an input folder holds, checked: a JSON object
    (bounded, no duplicate keys) whose ``weight_map`` maps tensor names to plain file names in the same folder (no
    ``/``, ``\\`` or ``..``: an index cannot point outside its folder), each present as a regular file when
    ``check_files`` (a symlink leaving the folder is refused). :class:`~maskport.errors.UnreadableFile` naming the
    index and the field."""
    from ..errors import UnreadableFile
    from .jsonfile import field, read_json_file

    index = Path(index)
    data = read_json_file(index, what="index")
    wm = field(data, "weight_map", dict, str(index))
    folder = index.parent
    real_folder = folder.resolve()
    seen: set[str] = set()
    for name, file in wm.items():
        if not isinstance(file, str):
            raise UnreadableFile(f"{index}: weight_map[{name[:80]!r}] should be a file name, found "
                                 f"{type(file).__name__}")
        if file in seen:
            continue
        if not file or "/" in file or "\\" in file or file in (".", "..") or "\x00" in file:
            raise UnreadableFile(f"{index}: weight_map[{name[:80]!r}] = {file[:80]!r} is not a plain file name in "
                                 f"the index's folder")
        if check_files:
            p = folder / file
            if not p.is_file():
                raise UnreadableFile(f"{index} names shard {file}, which is missing")
            if p.resolve().parent != real_folder:
                raise UnreadableFile(f"{index}: shard {file} is a link to a file outside {folder}")
        seen.add(file)
    return dict(wm)
