"""Stream a plan into sharded safetensors, one step at a time.

Because the plan knows every output's name, shape and dtype before any data is read, each shard's
safetensors header can be written first and the tensor bytes appended one by one: at most one step's
tensors are in memory at any time, whatever the shard size. The byte layout is the documented
safetensors format (8-byte little-endian header length, JSON header, aligned, then the raw row-major
little-endian data), which ``safetensors.safe_open`` reads back; tests check that.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import ShapeMismatch
from .plan import Plan, PlannedStep

ST_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass
class Shard:
    filename: str
    steps: list[PlannedStep] = field(default_factory=list)
    nbytes: int = 0
    sha256: str = ""


def assign_shards(plan: Plan, max_shard_size: int) -> list[Shard]:
    """Greedy packing in plan order; all outputs of one step stay in the same shard. A step larger than
    ``max_shard_size`` gets a shard of its own."""
    shards: list[Shard] = []
    cur = Shard("")
    for ps in plan.steps:
        size = sum(i.nbytes for i in ps.output_infos)
        if cur.steps and cur.nbytes + size > max_shard_size:
            shards.append(cur)
            cur = Shard("")
        cur.steps.append(ps)
        cur.nbytes += size
    if cur.steps:
        shards.append(cur)
    n = len(shards)
    for i, s in enumerate(shards):
        s.filename = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


def _header(shard: Shard, metadata: dict[str, str]) -> bytes:
    h: dict[str, object] = {"__metadata__": metadata}
    off = 0
    for ps in shard.steps:
        for name, info in zip(ps.step.targets, ps.output_infos):
            h[name] = {"dtype": ST_DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                       "data_offsets": [off, off + info.nbytes]}
            off += info.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def run_step(ps: PlannedStep, plan: Plan) -> list[torch.Tensor]:
    """Load a step's inputs, compute, cast to the planned dtypes, and check the planned shapes."""
    step = ps.step
    xs = [plan.sources[r.source].load(r.key) for r in step.inputs]
    outs = step.compute(xs)
    result = []
    for name, t, info in zip(step.targets, outs, ps.output_infos):
        if tuple(t.shape) != info.shape:
            raise ShapeMismatch(f"{name}: computed shape {tuple(t.shape)} differs from the planned {info.shape}")
        result.append(t.to(info.dtype))
    return result


def write_shards(
    plan: Plan,
    out_dir: Path,
    *,
    max_shard_size: int,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Shard]:
    """Write every step of ``plan`` into ``out_dir`` (which must exist) and return the shards with their
    sha256. Also writes ``model.safetensors.index.json`` when there is more than one shard."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise RuntimeError("big-endian hosts are not supported")
    meta = {"format": "pt", **(metadata or {})}
    shards = assign_shards(plan, max_shard_size)
    for shard in shards:
        h = hashlib.sha256()
        header = _header(shard, meta)
        with open(out_dir / shard.filename, "wb") as f:
            f.write(header)
            h.update(header)
            for ps in shard.steps:
                for t in run_step(ps, plan):
                    b = _as_bytes(t)
                    f.write(b)
                    h.update(b)
                    del b
                if progress:
                    progress(sum(i.nbytes for i in ps.output_infos))
        shard.sha256 = h.hexdigest()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": plan.total_bytes()},
            "weight_map": {t: s.filename for s in shards for ps in s.steps for t in ps.step.targets},
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return shards


def parse_size(text: str | int) -> int:
    """'5GB', '500MiB', '2G', 1024 -> bytes (decimal units for GB/MB/KB, binary for GiB/MiB/KiB)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            try:
                value = float(num)
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * mult)
    if s.isdigit() and int(s) > 0:
        return int(s)
    raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
