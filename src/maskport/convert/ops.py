"""The tensor operations a mapping rule can apply. Small pure functions, each with a shape function.

Every op takes a list of input tensors and returns a list of output tensors; its ``shapes`` twin takes
the input shapes and returns the output shapes (raising ``ValueError`` on inconsistent inputs), so a
whole conversion can be checked before any tensor data is read.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Executor
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
                    block_bytes: int | None = None, executor: Executor | None = None,
                    workers: int = 1, nonfinite: list | None = None) -> torch.Tensor:
    """:func:`lora_merge` written into ``out`` (any float dtype, the shape of ``w``; it may be ``w`` itself), a
    block of rows at a time: each block is up-cast, merged in float32 and cast to ``out``'s dtype while it is
    still in the caches. A whole-matrix float32 copy of ``w`` would cross memory three more times; on machines
    with little memory bandwidth that costs more than the matrix product. Every row gets the same float32 values
    whatever ``out``'s dtype (the blocks do not depend on it).

    ``executor`` with ``workers`` > 1: the blocks are shared out between the calling thread and ``workers - 1``
    tasks of ``executor`` (each takes the next block not yet taken; torch releases the GIL in its kernels), so a
    merge uses several cores even where torch computes with one thread. Every block is computed by the same
    calls on the same shapes (each thread has its own float32 block buffer) whichever thread takes it, so the
    result does not depend on ``workers``; the function returns once every block is written.

    ``nonfinite``: a list to which the index of every written block holding a NaN or an infinity (in ``out``'s
    dtype) is appended; each block is checked right after it is written, while it is still in the caches, by its
    minimum and maximum (``torch.aminmax`` propagates NaN), so the writer need not read the output again."""
    if tuple(out.shape) != tuple(w.shape) or not out.is_contiguous():
        raise ValueError(f"lora_merge_rows needs a contiguous {tuple(w.shape)} output, got {tuple(out.shape)}")
    rows, cols = w.shape
    block_bytes = MERGE_BLOCK_BYTES if block_bytes is None else block_bytes
    step = max(1, min(rows, block_bytes // (4 * max(1, cols))))
    a32 = a.float()
    blocks = -(-rows // step)
    taken = itertools.count()  # next() on it is atomic (the GIL): each block index is handed out once
    failed: list[bool] = []    # set when a thread fails: the others stop at their next block

    def merge_blocks() -> None:
        tmp = torch.empty((step, cols), dtype=torch.float32)
        try:
            for k in taken:
                if k >= blocks or failed:
                    return
                i = k * step
                j = min(rows, i + step)
                t = tmp[: j - i]
                t.copy_(w[i:j])
                t.addmm_(b[i:j].float(), a32, alpha=scaling)
                out[i:j].copy_(t)
                if nonfinite is not None:
                    lo, hi = torch.aminmax(out[i:j])
                    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                        nonfinite.append(k)
        except BaseException:
            failed.append(True)
            raise

    helpers = [executor.submit(merge_blocks) for _ in range(min(workers, blocks) - 1)] if executor else []
    try:
        merge_blocks()
    finally:
        errors = []
        for f in helpers:  # every helper is done before the buffers are handed on (or back, on an error)
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised once every helper is done
                errors.append(exc)
    if errors:
        raise errors[0]
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


# InternLM2-style fused qkv, rows grouped per key-value head: [kv0: q*groups, k, v][kv1: ...] (see
# maskport.families.sa2va_internvl.internlm2_llama for the layout and its source)
def split_wqkv(x: torch.Tensor, num_heads: int, num_kv_heads: int) -> list[torch.Tensor]:
    """A fused qkv weight ``[(H + 2*KV) * d, in]`` grouped per key-value head (or bias ``[(H + 2*KV) * d]``) ->
    separate ``q [H*d, ...]``, ``k [KV*d, ...]``, ``v [KV*d, ...]`` (rows gathered per key-value group, see the module
    docstring)."""
    groups, d = _groups_and_head_dim(tuple(x.shape), num_heads, num_kv_heads)
    rest = tuple(x.shape[1:])
    g = x.reshape(num_kv_heads, groups + 2, d, *rest)
    q = g[:, :groups].reshape(num_heads * d, *rest)
    k = g[:, groups].reshape(num_kv_heads * d, *rest)
    v = g[:, groups + 1].reshape(num_kv_heads * d, *rest)
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def split_wqkv_shapes(shape: tuple[int, ...], num_heads: int, num_kv_heads: int) -> list[tuple[int, ...]]:
    groups, d = _groups_and_head_dim(tuple(shape), num_heads, num_kv_heads)
    rest = tuple(shape[1:])
    return [(num_heads * d, *rest), (num_kv_heads * d, *rest), (num_kv_heads * d, *rest)]


def concat_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The inverse of :func:`split_wqkv`: separate ``q``, ``k``, ``v`` -> one fused qkv (rows grouped per
    key-value head: that head's ``groups`` query heads, then its key head, then its value head)."""
    shape = concat_wqkv_shapes(tuple(q.shape), tuple(k.shape), tuple(v.shape), num_heads, num_kv_heads)
    groups, d = num_heads // num_kv_heads, q.shape[0] // num_heads
    rest = tuple(q.shape[1:])
    g = torch.cat([q.reshape(num_kv_heads, groups, d, *rest), k.reshape(num_kv_heads, 1, d, *rest),
                   v.reshape(num_kv_heads, 1, d, *rest)], dim=1)
    return g.reshape(shape).contiguous()


def concat_wqkv_shapes(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...], num_heads: int,
                       num_kv_heads: int) -> tuple[int, ...]:
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    q, k, v = tuple(q), tuple(k), tuple(v)
    if q[0] % num_heads or k != v or k[0] * num_heads != q[0] * num_kv_heads or q[1:] != k[1:]:
        raise ValueError(f"q {q}, k {k}, v {v} are not {num_heads} query and {num_kv_heads} key-value heads of "
                         "one head size")
    return (q[0] + 2 * k[0], *q[1:])


def _groups_and_head_dim(shape: tuple[int, ...], num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    groups = num_heads // num_kv_heads
    rows = shape[0]
    if rows % (num_kv_heads * (groups + 2)):
        raise ValueError(f"wqkv has {rows} rows, not a multiple of num_key_value_heads * (groups + 2) = "
                         f"{num_kv_heads} * {groups + 2}: wrong head counts?")
    return groups, rows // (num_kv_heads * (groups + 2))


# ----------------------------------------------------------------------------------------------------------------
# Typed ops: the functions above bound to their parameters, as the mapping tables name them
# ----------------------------------------------------------------------------------------------------------------
class Op:
    """A tensor operation with its parameters bound in the table: :meth:`shapes` (planning, no data),
    :meth:`compute` (list of tensors in, list out), :meth:`describe` (the report's name for it). Ops with a faster
    path into a preallocated buffer offer ``compute_into``; the writer dispatches on the op's type."""

    label = "op"
    #: outputs take the export dtype even from non-floating inputs (a LoRA merge is always float math)
    float_output = False

    def shapes(self, shapes: Sequence[Shape]) -> list[Shape]:  # pragma: no cover - interface
        raise NotImplementedError

    def compute(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return self.label

    def params(self) -> dict:
        return {}


class Identity(Op):
    """The tensor unchanged (``label``: how the rule used it: rename, take, copy)."""

    def __init__(self, label: str = "rename"):
        self.label = label

    def shapes(self, shapes):
        return identity_shapes(shapes)

    def compute(self, xs):
        return identity(xs)

    def __eq__(self, other):
        return isinstance(other, Identity) and other.label == self.label

    def __hash__(self):
        return hash(("identity", self.label))


class LoraMerge(Op):
    """``W + scaling * B @ A`` (inputs: base weight, ``lora_A``, ``lora_B``), in float32: :func:`lora_merge`."""

    label = "lora_merge"
    float_output = True

    def __init__(self, scaling: float | None):
        self.scaling = scaling

    def _scaling(self) -> float:
        if self.scaling is None:
            raise RuntimeError("LoRA scaling unknown")
        return self.scaling

    def shapes(self, shapes):
        return lora_merge_shapes(shapes)

    def compute(self, xs):
        return [lora_merge(xs[0], xs[1], xs[2], self._scaling())]

    def compute_into(self, out: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     executor: Executor | None = None, workers: int = 1,
                     nonfinite: list | None = None) -> torch.Tensor:
        return lora_merge_rows(out, w, a, b, self._scaling(), executor=executor, workers=workers,
                               nonfinite=nonfinite)

    def describe(self):
        return f"lora_merge(scaling={self.scaling})"

    def params(self):
        return {"scaling": self.scaling}


class Split(Op):
    """One tensor split along ``dim`` into ``sizes`` (``n`` equal pieces when ``sizes`` is None)."""

    label = "split"

    def __init__(self, dim: int, n: int, sizes: Sequence[int] | None = None):
        self.dim, self.n, self.sizes = dim, n, (tuple(sizes) if sizes is not None else None)

    def _sizes(self, shape: Shape) -> list[int]:
        if self.sizes is not None:
            return list(self.sizes)
        if shape[self.dim] % self.n:
            raise ValueError(f"dim {self.dim} of {tuple(shape)} does not split into {self.n} equal parts")
        return [shape[self.dim] // self.n] * self.n

    def shapes(self, shapes):
        return split_shapes(shapes[0], self._sizes(tuple(shapes[0])), self.dim)

    def compute(self, xs):
        return split(xs[0], self._sizes(tuple(xs[0].shape)), self.dim)

    def describe(self):
        return f"split(dim={self.dim})"


class Concat(Op):
    """The inputs concatenated along ``dim``."""

    label = "concat"

    def __init__(self, dim: int):
        self.dim = dim

    def shapes(self, shapes):
        return [concat_shapes(shapes, self.dim)]

    def compute(self, xs):
        return [concat(xs, self.dim)]

    def describe(self):
        return f"concat(dim={self.dim})"


class Duplicate(Op):
    """One tensor written ``n`` times; every copy after the first is a clone (outputs never share storage)."""

    label = "duplicate"

    def __init__(self, n: int):
        self.n = n

    def shapes(self, shapes):
        return [tuple(shapes[0])] * self.n

    def compute(self, xs):
        return [xs[0]] + [xs[0].clone() for _ in range(self.n - 1)]

    def describe(self):
        return f"duplicate(x{self.n})"


class GroupedQkvSplit(Op):
    """A fused qkv whose rows are grouped per key-value head -> separate q, k, v in the grouped-query layout:
    :func:`split_wqkv`."""

    label = "split_wqkv"

    def __init__(self, num_heads: int, num_kv_heads: int):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads

    def shapes(self, shapes):
        return split_wqkv_shapes(tuple(shapes[0]), self.num_heads, self.num_kv_heads)

    def compute(self, xs):
        return split_wqkv(xs[0], self.num_heads, self.num_kv_heads)


class GroupedQkvConcat(Op):
    """The inverse of :class:`GroupedQkvSplit`: separate q, k, v projections -> one fused qkv projection grouped
    per key-value head: :func:`concat_wqkv`."""

    label = "concat_wqkv"

    def __init__(self, num_heads: int, num_kv_heads: int):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads

    def shapes(self, shapes):
        return [concat_wqkv_shapes(*(tuple(s) for s in shapes), self.num_heads, self.num_kv_heads)]

    def compute(self, xs):
        return [concat_wqkv(xs[0], xs[1], xs[2], self.num_heads, self.num_kv_heads)]


class Chain(Op):
    """Ops applied one after the other: the first takes the step's inputs, each next one the previous outputs
    (e.g. a LoRA merge, then a grouped qkv split)."""

    def __init__(self, *chain: Op):
        self.chain = tuple(chain)
        self.float_output = any(o.float_output for o in chain)

    @property
    def label(self) -> str:  # type: ignore[override]
        return "+".join(o.label for o in self.chain)

    def shapes(self, shapes):
        for o in self.chain:
            shapes = o.shapes(shapes)
        return list(shapes)

    def compute(self, xs):
        for o in self.chain:
            xs = o.compute(xs)
        return list(xs)

    def describe(self):
        return "+".join(o.describe() for o in self.chain)

    def params(self):
        out: dict = {}
        for o in self.chain:
            out.update(o.params())
        return out
