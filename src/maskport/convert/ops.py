"""The tensor operations a mapping rule can apply. Small pure functions, each with a shape function.

Every op takes a list of input tensors and returns a list of output tensors; its ``shapes`` twin takes
the input shapes and returns the output shapes (raising ``ValueError`` on inconsistent inputs), so a
whole conversion can be checked before any tensor data is read.
"""

from __future__ import annotations

from typing import Sequence

import torch

Shape = tuple[int, ...]


def identity(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rename: the tensor unchanged."""
    return [xs[0]]


def identity_shapes(shapes: Sequence[Shape]) -> list[Shape]:
    return [tuple(shapes[0])]


MERGE_BLOCK_BYTES = 4 << 20  # float32 bytes of one row block of a merge (a few MB: it stays in the CPU's caches)


def lora_merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` computed in float32 (peft's ``merge_and_unload`` for a Linear layer).

    Args:
        w: base weight, shape (out, in).
        a: ``lora_A`` weight, shape (r, in).
        b: ``lora_B`` weight, shape (out, r).
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
    """
    return lora_merge_rows(torch.empty(tuple(w.shape), dtype=torch.float32), w, a, b, scaling)


def lora_merge_rows(out: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                    block_bytes: int = MERGE_BLOCK_BYTES) -> torch.Tensor:
    """:func:`lora_merge` written into ``out`` (any float dtype, the shape of ``w``; it may be ``w`` itself), a
    block of rows at a time: each block is up-cast, merged in float32 and cast to ``out``'s dtype while it is
    still in the caches. A whole-matrix float32 copy of ``w`` would cross memory three more times; on machines
    with little memory bandwidth that costs more than the matrix product. Every row gets the same float32 values
    whatever ``out``'s dtype (the blocks do not depend on it)."""
    if tuple(out.shape) != tuple(w.shape) or not out.is_contiguous():
        raise ValueError(f"lora_merge_rows needs a contiguous {tuple(w.shape)} output, got {tuple(out.shape)}")
    rows, cols = w.shape
    step = max(1, min(rows, block_bytes // (4 * max(1, cols))))
    a32 = a.float()
    tmp = torch.empty((step, cols), dtype=torch.float32)
    for i in range(0, rows, step):
        j = min(rows, i + step)
        t = tmp[: j - i]
        t.copy_(w[i:j])
        t.addmm_(b[i:j].float(), a32, alpha=scaling)
        out[i:j].copy_(t)
    return out


def lora_merge_shapes(shapes: Sequence[Shape]) -> list[Shape]:
    w, a, b = (tuple(s) for s in shapes)
    if len(w) != 2 or len(a) != 2 or len(b) != 2:
        raise ValueError(f"LoRA merge needs 2-D tensors, got base {w}, A {a}, B {b}")
    if a[0] != b[1] or a[1] != w[1] or b[0] != w[0]:
        raise ValueError(f"LoRA shapes do not fit: base {w}, A {a}, B {b} (expected A (r, {w[1]}), B ({w[0]}, r))")
    return [w]


def split(x: torch.Tensor, sizes: Sequence[int], dim: int) -> list[torch.Tensor]:
    """Split along ``dim`` into pieces of the given sizes (e.g. a fused qkv into q, k, v)."""
    return list(torch.split(x, list(sizes), dim=dim))


def split_shapes(shape: Shape, sizes: Sequence[int], dim: int) -> list[Shape]:
    shape = tuple(shape)
    if sum(sizes) != shape[dim]:
        raise ValueError(f"cannot split dim {dim} of {shape} into {list(sizes)}")
    return [shape[:dim] + (s,) + shape[dim + 1:] for s in sizes]


def concat(xs: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate along ``dim`` (e.g. separate q, k, v into one fused weight)."""
    return torch.cat(list(xs), dim=dim)


def concat_shapes(shapes: Sequence[Shape], dim: int) -> Shape:
    shapes = [tuple(s) for s in shapes]
    first = shapes[0]
    for s in shapes[1:]:
        if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != dim % len(first)):
            raise ValueError(f"cannot concatenate shapes {shapes} along dim {dim}")
    return first[:dim % len(first)] + (sum(s[dim] for s in shapes),) + first[dim % len(first) + 1:]


def reshape(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Reshape (e.g. a (1, C) parameter stored as (C,) in the other layout)."""
    return x.reshape(tuple(shape))


def reshape_shapes(shape: Shape, new: Sequence[int]) -> Shape:
    n_old, n_new = 1, 1
    for s in shape:
        n_old *= s
    for s in new:
        n_new *= s
    if n_old != n_new:
        raise ValueError(f"cannot reshape {tuple(shape)} to {tuple(new)}")
    return tuple(new)
