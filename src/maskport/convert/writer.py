"""Stream a plan into sharded safetensors, one step at a time.

Because the plan knows every output's name, shape and dtype before any data is read, each shard's
safetensors header can be written first and the tensor bytes appended one by one. The byte layout is the
documented safetensors format (8-byte little-endian header length, JSON header, aligned, then the raw
row-major little-endian data), which ``safetensors.safe_open`` reads back; tests check that.

Memory and speed (see ``benchmarks/convert/``):

- every large tensor lives in a buffer of a small pool that is reused from step to step. Fresh memory costs a
  page fault per 4 KiB page on first touch (on the benchmark machine 0.6 GB/s, ten times slower than writing
  memory that is already mapped), and a 3B conversion would otherwise fault in ~30 GB;
- the pool has a byte budget: the largest single step's needs, or :data:`MIN_BUDGET` (384 MiB) if more, room
  for the reader to work a few steps ahead. A step waits until its buffers fit, so at most ``budget`` bytes of
  tensors are alive, whatever the model size;
- a reader thread reads the steps' inputs, in order and ahead of the computation, straight into pool buffers
  (:meth:`~maskport.convert.sources.TensorSource.load_into`); a LoRA merge runs a few MB of float32 rows at a
  time and writes back into its input's buffer (:func:`~maskport.convert.ops.lora_merge_rows`); a tensor
  converted to another dtype is written from a second buffer, or, from a source that converts while it reads
  (:meth:`~maskport.convert.sources.TensorSource.reads_as`: ZeRO-3's fp32 masters), built in its output buffer a
  16 MiB chunk at a time (a 7B embedding's fp32 master, 2 GiB, never exists whole);
- a tensor that is only renamed (same dtype, and its source can say where its bytes lie in the file:
  :meth:`~maskport.convert.sources.TensorSource.file_span`) takes no buffer at all: the writer copies it file to
  file in the kernel (``os.copy_file_range``, falling back to ``pread``/``write`` through a small buffer where the
  kernel refuses). At 3B that is 2.6 of the 8.6 GB written (the vision tower, the embeddings, the norms);
- writing runs on a thread of its own (it releases the GIL), overlapping the next steps' reading and LoRA
  matmuls; a buffer returns to the pool once it is written. The next step's inputs are announced to the kernel
  (``posix_fadvise``) for read-ahead;
- shard checksums (``checksums=True``, CLI ``--sha256``) are computed by a hasher thread from the shard file
  itself, following the writer through read-only mappings of the written bytes (no copy; one 64 MiB window
  mapped at a time), so the sha256 is that of the bytes in the file, and hashing (~1.5 GB/s here) overlaps the
  writer's time in ``write``, where the kernel throttles it to the disk's speed;
- the reader, writer and hasher threads run at a lower priority (nice +10) than the computing threads;
- a LoRA merge's row blocks are shared out between :data:`MERGE_WORKERS` threads (cores - 1: the computing
  thread and an executor's; on 2 cores the computing thread alone, which measured faster than two there), each
  computing with one torch thread: every block is the same calls on the same shapes whichever thread takes it,
  so the bytes do not depend on the number of threads (an earlier engine measured a second OpenMP thread inside
  each ``addmm`` as slower on a 2-core machine);
- every output is checked for NaN/inf before it is written (:func:`check_finite`): a merge checks each block by
  its minimum and maximum right after computing it (in the caches, on the merge threads); other outputs are
  checked in chunks the same way. ``isfinite(x).all()``, used before, was the largest single cost on the
  computing thread of a 3B conversion (for bfloat16 it runs at ~0.2 GB/s here: it writes a bool tensor). See
  ``benchmarks/convert/RESULTS.md`` for a profile of where the time goes.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import ops
from ..errors import NonFiniteOutput, ShapeMismatch
from .plan import Plan, PlannedStep
from ..errors import UnreadableFile
from ..io.safetensors import ST_DTYPE_NAMES, build_header  # noqa: F401  (ST_DTYPE_NAMES: importable from here)
from ..io.shards import pack_shards, shard_filenames, write_index
from ..io.sizes import parse_size  # noqa: F401  (importable from here, as before maskport.io)
from .sources import CAST_CHUNK_BYTES, TensorInfo, pread_into


@dataclass
class Shard:
    filename: str
    steps: list[PlannedStep] = field(default_factory=list)
    nbytes: int = 0
    sha256: str | None = None  # None unless written with checksums=True


def _is_merge(ps: PlannedStep) -> bool:
    return isinstance(ps.step.op, ops.LoraMerge) or (isinstance(ps.step.op, ops.Chain) and ps.step.op.float_output)


def write_order(plan: Plan) -> list[PlannedStep]:
    """The steps in the order they are written: the LoRA merges (CPU-bound) interleaved with the other steps
    (I/O-bound copies) in proportion to their output bytes, so that matmuls and copying overlap instead of
    following each other. Deterministic; the relative order within each group is the plan's."""
    heavy = [ps for ps in plan.steps if _is_merge(ps)]
    light = [ps for ps in plan.steps if not _is_merge(ps)]
    if not heavy or not light:
        return list(plan.steps)

    def size(ps: PlannedStep) -> int:
        return max(1, sum(i.nbytes for i in ps.output_infos))

    total_h, total_l = sum(map(size, heavy)), sum(map(size, light))
    out: list[PlannedStep] = []
    i = j = done_h = done_l = 0
    while i < len(heavy) or j < len(light):
        if j >= len(light) or (i < len(heavy) and done_h * total_l <= done_l * total_h):
            out.append(heavy[i])
            done_h += size(heavy[i])
            i += 1
        else:
            out.append(light[j])
            done_l += size(light[j])
            j += 1
    return out


def assign_shards(plan: Plan, max_shard_size: int, steps: list[PlannedStep] | None = None) -> list[Shard]:
    """Greedy packing in plan order (or ``steps``' order); all outputs of one step stay in the same shard. A step
    larger than ``max_shard_size`` gets a shard of its own (:func:`maskport.io.shards.pack_shards`); the shards
    are named by :func:`maskport.io.shards.shard_filenames`."""
    def size(ps: PlannedStep) -> int:
        return sum(i.nbytes for i in ps.output_infos)

    groups = pack_shards(plan.steps if steps is None else steps, size, max_shard_size)
    return [Shard(name, group, sum(map(size, group))) for name, group in zip(shard_filenames(len(groups)), groups)]


def _header(shard: Shard, metadata: dict[str, str]) -> bytes:
    return build_header(((name, info) for ps in shard.steps for name, info in zip(ps.step.targets, ps.output_infos)),
                        metadata)


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")  # 1-D: len = bytes


_prefetched = threading.local()


def run_step(ps: PlannedStep, plan: Plan) -> list[torch.Tensor]:
    """Load a step's inputs, compute, cast to the planned dtypes, and check the planned shapes.

    :func:`write_shards` calls this once per step, in order, on its computing thread, after its reader thread
    has read the step's inputs into pooled buffers; the outputs are then computed in those buffers."""
    ld = getattr(_prefetched, "step", None)
    if ld is not None and ld.ps is ps:
        return _compute_step(ld)
    step = ps.step
    xs = [plan.sources[r.source].load(r.key) for r in step.inputs]
    outs = step.compute(xs)
    result = []
    for name, t, info in zip(step.targets, outs, ps.output_infos):
        if tuple(t.shape) != info.shape:
            raise ShapeMismatch(f"{name}: computed shape {tuple(t.shape)} differs from the planned {info.shape}")
        result.append(t.to(info.dtype))
    return result


_SMALL = 1 << 20          # tensors under 1 MiB are not pooled (the allocator reuses small blocks itself)
_ROUND = 2 << 20          # pooled buffer sizes are rounded up to 2 MiB, so buffers fit more requests
MIN_BUDGET = 384 << 20  # read-ahead room: with 128 MiB the reader waited on the pool for most of a 3B run


def _round(n: int) -> int:
    return -(-n // _ROUND) * _ROUND


def _alloc(n: int) -> torch.Tensor:
    """A pooled buffer in its own anonymous memory mapping: evicting it gives the memory back to the system at
    once (heap blocks of the same sizes can stay resident), and large pages are requested where supported."""
    try:
        mm = mmap.mmap(-1, n)
    except (OSError, ValueError):  # pragma: no cover - no anonymous mappings
        return torch.empty(n, dtype=torch.uint8)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # pragma: no cover - advisory only
            pass
    return torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps the mapping alive; unmapped with it


class _Pool:
    """Reusable ``uint8`` buffers under a byte budget (see the module docstring)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.free: list[torch.Tensor] = []   # least recently returned first
        self.used = 0                         # bytes handed out (buffers and reservations)
        self.cached = 0                       # bytes of free buffers
        self.peak = 0
        self.cond = threading.Condition()
        self.failed: Callable[[], BaseException | None] = lambda: None

    def take(self, sizes: list[int], reserve: int = 0) -> list[torch.Tensor | None]:
        """Buffers for ``sizes`` (``None`` for small ones, which the caller allocates), plus ``reserve`` bytes
        accounted for memory the step allocates itself; all at once, waiting while they do not fit."""
        pooled = [(i, n) for i, n in enumerate(sizes) if n >= _SMALL]
        with self.cond:
            while True:
                err = self.failed()
                if err is not None:
                    raise err
                got = self._try_take(pooled, reserve)
                if got is not None:
                    out: list[torch.Tensor | None] = [None] * len(sizes)
                    for i, b in got.items():
                        out[i] = b
                    return out
                self.cond.wait(0.5)

    def _try_take(self, pooled: list[tuple[int, int]], reserve: int) -> dict[int, torch.Tensor] | None:
        # first choice: reuse free buffers that fit snugly (a 600 MB buffer kept for a 13 MB tensor would block
        # the pipeline), allocate the rest; second: any free buffer that fits; else wait for buffers to return
        for snug in (True, False):
            plan = self._plan_take(pooled, reserve, snug)
            if plan is not None:
                return plan
        return None

    def _plan_take(self, pooled: list[tuple[int, int]], reserve: int, snug: bool) -> dict[int, torch.Tensor] | None:
        picked: dict[int, torch.Tensor] = {}
        free = list(self.free)
        for i, n in sorted(pooled, key=lambda x: -x[1]):
            fits = [j for j, b in enumerate(free) if b.numel() >= n and (not snug or b.numel() <= 2 * n + _ROUND)]
            if fits:
                j = min(fits, key=lambda j: free[j].numel())
                picked[i] = free.pop(j)  # (by position: == on tensors compares values)
        new = {i: _round(n) for i, n in pooled if i not in picked}
        need = sum(b.numel() for b in picked.values()) + sum(new.values()) + reserve
        if self.used and self.used + need > self.budget:
            return None
        # room for the new buffers: evict unpicked free buffers, least recently used first
        unpicked = sum(b.numel() for b in free)
        while free and self.used + need + unpicked > self.budget:
            unpicked -= free.pop(0).numel()
        self.free = free
        self.cached = unpicked
        for i, n in new.items():
            picked[i] = _alloc(n)
        self.used += need
        self.peak = max(self.peak, self.used + self.cached)
        return picked

    def give(self, buffers: list[torch.Tensor], reserve: int = 0) -> None:
        with self.cond:
            for b in buffers:
                self.used -= b.numel()
                self.free.append(b)
                self.cached += b.numel()
            self.used -= reserve
            self.cond.notify_all()


IO_NICENESS = int(os.environ.get("MASKPORT_IO_NICENESS", "10"))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _merge_workers() -> int:
    """Threads that share a LoRA merge's row blocks: one fewer than the cores this process may run on (at least
    one, at most 16; the reader, writer and hasher need the rest), each computing with one torch thread;
    ``MASKPORT_MERGE_THREADS`` overrides. On the 2-core benchmark machine (load average 2-5) one thread was faster
    than two: 3B conversion 20.3/21.4/23.5 s with one, 24.0/24.2/27.9 s with two (the I/O threads, in the kernel
    ~18 s of a conversion, then compete with both merge threads)."""
    env = os.environ.get("MASKPORT_MERGE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), 64)
    return max(1, min(_cores() - 1, 16))


MERGE_WORKERS = _merge_workers()


def lower_thread_priority(niceness: int = IO_NICENESS) -> None:
    """Lower the calling thread's scheduling priority (Linux: threads have their own nice value; elsewhere a
    no-op). The computing thread (LoRA merges) is the critical path; the reader and the writer have slack and
    mostly wait in the kernel. Raising one's own niceness needs no privileges."""
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except (AttributeError, OSError):  # pragma: no cover - not permitted or not supported
        pass


class _Release:
    """Returns a step's buffers to the pool once every holder (the writer) is done with them."""

    def __init__(self, pool: _Pool, buffers: list[torch.Tensor], reserve: int, holders: int = 1):
        self.pool, self.buffers, self.reserve, self.left = pool, buffers, reserve, holders
        self.lock = threading.Lock()

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self.pool.give(self.buffers, self.reserve)
            self.buffers = []


_STOP = object()


class _Worker(threading.Thread):
    """Runs queued jobs in order. After a failure it keeps draining its queue (running only the jobs'
    ``always`` parts, which return buffers) so that nobody waits forever; the error is re-raised by the caller."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.abort = False

    def run(self) -> None:
        lower_thread_priority()
        while True:
            job = self.q.get()
            if job is _STOP:
                return
            work, always = job
            try:
                if self.error is None and not self.abort:
                    work()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
            finally:
                if always is not None:
                    always()

    def put(self, work: Callable[[], None], always: Callable[[], None] | None = None) -> None:
        self.q.put((work, always))

    def stop(self) -> None:
        self.q.put(_STOP)
        self.join()


def _write_all(fd: int, data: memoryview) -> None:
    pos, n = 0, len(data)
    while pos < n:
        pos += os.write(fd, data[pos:pos + (1 << 30)])


_COPY_CHUNK = 8 << 20  # bytes per pread/write pass when the kernel cannot copy
_KERNEL_COPY_MAX = 1 << 30
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF,
                   errno.EPERM}


class _Copier:
    """Copies byte ranges of input files to a shard (at its file position) without loading them: the kernel
    copies page cache to page cache (``os.copy_file_range``: one copy, a third of the CPU time of ``pread`` +
    ``write``); where that is missing or refused (another file system, an old kernel), a loop of
    ``pread``/``write`` through one small buffer, for the rest of the conversion."""

    def __init__(self) -> None:
        self.kernel = hasattr(os, "copy_file_range")
        self._scratch: memoryview | None = None

    def copy(self, src: int, offset: int, nbytes: int, dst: int) -> None:
        pos = 0
        while pos < nbytes:
            if self.kernel:
                try:
                    got = os.copy_file_range(src, dst, min(nbytes - pos, _KERNEL_COPY_MAX), offset + pos)
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    self.kernel = False  # nothing was copied by the failed call: go on with the fallback
                    continue
                if got <= 0:
                    raise UnreadableFile(f"unexpected end of an input file at byte {offset + pos} (truncated?)")
                pos += got
                continue
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_COPY_CHUNK))
            buf = self._scratch[:min(nbytes - pos, _COPY_CHUNK)]
            pread_into(src, buf, offset + pos)
            _write_all(dst, buf)
            pos += len(buf)


_HASH_WINDOW = 64 << 20  # bytes of a shard mapped at a time for hashing


@dataclass
class _Written:
    """How far the writer got in one shard (shared with the hasher under its condition)."""

    shard: Shard
    path: Path
    nbytes: int = 0
    closed: bool = False


class _ShardHasher(threading.Thread):
    """The sha256 of every shard, of the bytes in the file as written: follows the writer through read-only
    mappings of the shard, a window at a time (no copy: the pages are the page cache the writer just filled, and
    at most one window counts towards the resident set). On its own thread, so hashing (~1.5 GB/s) overlaps the
    writer's time in ``write``, where the kernel may throttle it to the disk's speed."""

    def __init__(self) -> None:
        super().__init__(name="maskport-sha256", daemon=True)
        self.cond = threading.Condition()
        self.shards: list[_Written] = []
        self.last = False      # no more shards will be added
        self.abort = False
        self.error: BaseException | None = None

    def add(self, shard: Shard, path: Path) -> _Written:
        with self.cond:
            w = _Written(shard, path)
            self.shards.append(w)
            self.cond.notify_all()
            return w

    def wrote(self, w: _Written, nbytes: int) -> None:
        with self.cond:
            w.nbytes += nbytes
            self.cond.notify_all()

    def closed(self, w: _Written) -> None:
        with self.cond:
            w.closed = True
            self.cond.notify_all()

    def no_more(self) -> None:
        with self.cond:
            self.last = True
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.abort = True
            self.cond.notify_all()
        self.join()

    def run(self) -> None:
        lower_thread_priority()
        try:
            i = 0
            while True:
                with self.cond:
                    while i >= len(self.shards) and not self.last and not self.abort:
                        self.cond.wait(0.5)
                    if self.abort or i >= len(self.shards):
                        return
                    w = self.shards[i]
                self._hash(w)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc

    def _hash(self, w: _Written) -> None:
        h = hashlib.sha256()
        pos = 0
        fd = -1
        try:
            while True:
                with self.cond:
                    while w.nbytes <= pos and not w.closed and not self.abort:
                        self.cond.wait(0.5)
                    if self.abort:
                        return
                    end, closed = w.nbytes, w.closed
                if pos >= end and closed:
                    break
                if fd < 0:
                    fd = os.open(w.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                while pos < end:
                    n = min(end - pos, _HASH_WINDOW)
                    _hash_range(fd, pos, n, h)
                    pos += n
        finally:
            if fd >= 0:
                os.close(fd)
        w.shard.sha256 = h.hexdigest()


def _hash_range(fd: int, offset: int, nbytes: int, h) -> None:
    """Feed ``nbytes`` of ``fd`` at ``offset`` to ``h`` through a read-only mapping (pages mapped up front);
    through ``pread`` where the file cannot be mapped."""
    lo = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(fd, offset + nbytes - lo, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ, offset=lo)
    except (OSError, ValueError, AttributeError, TypeError):  # pragma: no cover - no file mappings here
        buf = bytearray(nbytes)
        pread_into(fd, memoryview(buf), offset)
        h.update(buf)
        return
    try:
        with memoryview(mm) as view:
            h.update(view[offset - lo:])
    finally:
        mm.close()


def _step_buffer_plan(ps: PlannedStep, plan: Plan) -> tuple[list[int], int, str]:
    """(pooled buffer sizes, extra bytes reserved, kind) for one step. Buffers: one per input (as the source
    reads it), then for a LoRA merge a float32 output buffer or an output buffer of another dtype (none when merged
    in place); for a renaming that changes dtype an output buffer. ``kind`` is ``lora``, ``identity``,
    ``passthrough`` (a renaming copied file to file by the writer: no buffers), ``cast-read`` (a renaming that
    changes dtype, from a source that converts while it reads: only the output buffer and one chunk) or
    ``generic``."""
    step = ps.step
    ins = [plan.sources[r.source].buffer_nbytes(r.key) for r in step.inputs]
    outs = [i.nbytes for i in ps.output_infos]
    if isinstance(step.op, ops.LoraMerge) and step.op.scaling is not None and len(step.inputs) == 3:
        w = ps.input_infos[0]
        n = w.nbytes // torch.empty((), dtype=w.dtype).element_size()
        out_dtype = ps.output_infos[0].dtype
        # merged in place when the output has the base weight's dtype; else into an output buffer (slot 3 for
        # float32, slot 4 otherwise: _compute_step's layout); the float32 work is a few MB of row blocks
        acc = [4 * n] if out_dtype == torch.float32 and w.dtype != torch.float32 else [0]
        extra = [] if out_dtype in (torch.float32, w.dtype) else [outs[0]]
        a = ps.input_infos[1]
        work = ops.MERGE_BLOCK_BYTES * MERGE_WORKERS + 4 * (a.nbytes // torch.empty((), dtype=a.dtype).element_size())
        return ins + acc + extra, work, "lora"  # work: the float32 row block and A in float32
    if isinstance(step.op, ops.Identity) and len(step.inputs) == 1 and len(outs) == 1:
        same = ps.input_infos[0].dtype == ps.output_infos[0].dtype
        if same and _file_span(ps, plan) is not None:
            return [], 0, "passthrough"  # copied file to file by the writer: no buffer
        r = step.inputs[0]
        if not same and plan.sources[r.source].reads_as(r.key, ps.output_infos[0].dtype):
            return outs, CAST_CHUNK_BYTES, "cast-read"  # converted while read: the output buffer and one chunk
        return ins + ([] if same else outs), 0, "identity"
    # anything else: the op allocates its own outputs (natural dtype, then the cast)
    natural = sum(i.nbytes * 2 for i in ps.output_infos)
    return ins, natural, "generic"


def _file_span(ps: PlannedStep, plan: Plan) -> tuple[int, int, int] | None:
    """The input's ``(fd, offset, nbytes)`` when a renaming step's output bytes are exactly the input's bytes in
    its file (same dtype, contiguous, as many bytes as planned), so the writer can copy them file to file."""
    r = ps.step.inputs[0]
    span = plan.sources[r.source].file_span(r.key)
    if span is None or span[2] != ps.output_infos[0].nbytes or ps.input_infos[0] != ps.output_infos[0]:
        return None
    return span


def pool_budget(plan: Plan) -> int:
    """The pool's byte budget for ``plan``: its largest step's needs, and at least :data:`MIN_BUDGET`."""
    need = 0
    for ps in plan.steps:
        sizes, reserve, _ = _step_buffer_plan(ps, plan)
        need = max(need, sum(_round(n) for n in sizes if n >= _SMALL) + reserve)
    return max(need, MIN_BUDGET)


def _view(buf: torch.Tensor | None, info: TensorInfo) -> torch.Tensor:
    if buf is None:
        return torch.empty(info.shape, dtype=info.dtype)
    return buf[:info.nbytes].view(info.dtype).view(info.shape) if info.nbytes else torch.empty(info.shape,
                                                                                                  dtype=info.dtype)


def _check_shape(name: str, t: torch.Tensor, info: TensorInfo) -> None:
    if tuple(t.shape) != info.shape:
        raise ShapeMismatch(f"{name}: computed shape {tuple(t.shape)} differs from the planned {info.shape}")


@dataclass
class _Loaded:
    """One step whose inputs are read: what the reader thread hands to the computing thread."""

    ps: PlannedStep
    xs: list[torch.Tensor]
    bufs: list[torch.Tensor | None]
    reserve: int
    kind: str
    finite: bool = False  # the outputs are known to hold no NaN/inf (checked while they were computed)

    @property
    def held(self) -> list[torch.Tensor]:
        return [b for b in self.bufs if b is not None]


def _read_step(ps: PlannedStep, plan: Plan, pool: _Pool) -> _Loaded:
    """Take the step's buffers from the pool (waiting while they do not fit) and read its inputs into them."""
    sizes, reserve, kind = _step_buffer_plan(ps, plan)
    if kind == "passthrough":
        return _Loaded(ps, [], [], 0, kind)
    bufs = pool.take(sizes, reserve)
    try:
        if kind == "cast-read":
            r = ps.step.inputs[0]
            xs = [plan.sources[r.source].load_into_as(r.key, ps.output_infos[0].dtype, bufs[0])]
        else:
            xs = [plan.sources[r.source].load_into(r.key, bufs[i]) for i, r in enumerate(ps.step.inputs)]
    except BaseException:
        pool.give([b for b in bufs if b is not None], reserve)
        raise
    return _Loaded(ps, xs, bufs, reserve, kind)


def _compute_step(ld: _Loaded) -> list[torch.Tensor]:
    """The step's outputs, contiguous, in the planned dtypes (in the step's buffers where possible)."""
    ps, xs, bufs, step = ld.ps, ld.xs, ld.bufs, ld.ps.step
    if ld.kind == "passthrough":
        return []  # nothing in memory: the writer copies the input's bytes file to file
    info = ps.output_infos[0]
    if ld.kind == "lora":
        w, a, b = xs
        _check_shape(step.targets[0], w, info)
        if info.dtype == w.dtype and bufs[0] is not None and w.is_contiguous():
            dst = w  # merged in place, a block of rows at a time: each block is read before it is written
        elif info.dtype == torch.float32:
            dst = _view(bufs[3], info)  # None (then allocated) when it was too small to pool
        else:
            dst = _view(bufs[4] if len(bufs) > 4 else None, info)
        nonfinite: list | None = [] if dst.dtype in _MINMAX_DTYPES and dst.numel() else None
        outs = [step.op.compute_into(dst, w, a, b, executor=getattr(_prefetched, "executor", None),
                                     workers=MERGE_WORKERS, nonfinite=nonfinite)]
        ld.finite = nonfinite is not None and not nonfinite  # checked block by block during the merge
    elif ld.kind == "cast-read":  # read in the output dtype already
        _check_shape(step.targets[0], xs[0], info)
        outs = [xs[0]]
    elif ld.kind == "identity":
        x = xs[0]
        _check_shape(step.targets[0], x, info)
        outs = [x] if x.dtype == info.dtype else [_view(bufs[1], info).copy_(x)]
    else:
        outs = []
        for name, t, oi in zip(step.targets, step.compute(xs), ps.output_infos):
            _check_shape(name, t, oi)
            outs.append(t.to(oi.dtype))
    return [t if t.is_contiguous() else t.contiguous() for t in outs]


_FINITE_CHUNK = 1 << 22  # elements checked at a time (bounded extra memory)


# dtypes whose finiteness is read off a chunk's minimum and maximum: ``torch.aminmax`` propagates NaN (documented),
# and a chunk without NaN holds an infinity exactly when its minimum or maximum is one. One vectorised reduction
# and no temporary, where ``isfinite(x).all()`` writes a bool tensor first: for bfloat16 on the benchmark machine
# (busy) ~20x faster on data in the caches (0.4 vs 9.2 ms per 2 MB) and 3-4x on data from memory (20 vs 60-90 ms
# per 45 MB); the old check was the largest single cost on the computing thread of a 3B conversion
_MINMAX_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN/inf (checked in chunks of :data:`_FINITE_CHUNK` elements)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    flat = t.reshape(-1)
    minmax = t.dtype in _MINMAX_DTYPES
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[i:i + _FINITE_CHUNK]
        if minmax:
            lo, hi = torch.aminmax(chunk)
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                return False
        elif not bool(torch.isfinite(chunk).all()):
            return False
    return True


def check_finite(ps: PlannedStep, plan: Plan, outs: list[torch.Tensor]) -> None:
    """An export never holds a NaN/inf that its inputs did not: a non-finite output whose inputs (read again from
    their sources, only in that case) are all finite is a :class:`NonFiniteOutput` naming the tensor (a non-finite
    LoRA scaling, or a value beyond the output dtype's range)."""
    bad = [name for name, t in zip(ps.step.targets, outs) if not all_finite(t)]
    if not bad:
        return
    inputs_finite = all(all_finite(plan.sources[r.source].load(r.key)) for r in ps.step.inputs)
    if inputs_finite:
        raise NonFiniteOutput(f"{bad[0]}: the export would hold NaN/inf values where every input tensor "
                              f"({', '.join(f'{r.source}:{r.key}' for r in ps.step.inputs)}) is finite "
                              f"(op {type(ps.step.op).__name__}, output dtype {ps.output_infos[0].dtype}: a non-finite "
                              f"LoRA scaling, or values beyond the dtype's range); nothing was written")


class _Aborted(Exception):
    pass


class _Reader(threading.Thread):
    """Reads the steps' inputs, in plan order, into pool buffers ahead of the computing thread (the pool's budget
    bounds how far ahead), and asks the kernel to read ahead the step after."""

    def __init__(self, steps: list[PlannedStep], plan: Plan, pool: _Pool, depth: int = 8):
        super().__init__(name="maskport-read", daemon=True)
        self.steps, self.plan, self.pool = steps, plan, pool
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.abort = False

    def run(self) -> None:
        lower_thread_priority()
        try:
            for i, ps in enumerate(self.steps):
                if i + 1 < len(self.steps):
                    for r in self.steps[i + 1].step.inputs:
                        self.plan.sources[r.source].prefetch(r.key)
                ld = _read_step(ps, self.plan, self.pool)
                if not self._put(ld):
                    self.pool.give(ld.held, ld.reserve)
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the computing thread
            self._put(exc)

    def _put(self, item) -> bool:
        while not self.abort:
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def get(self, failed: Callable[[], BaseException | None]) -> _Loaded:
        while True:
            try:
                item = self.q.get(timeout=0.2)
            except queue.Empty:
                err = failed()
                if err is not None:
                    raise err
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def stop(self) -> None:
        """Stop reading and hand back the buffers of steps read but not computed."""
        self.abort = True
        while self.is_alive() or not self.q.empty():
            try:
                item = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, _Loaded):
                self.pool.give(item.held, item.reserve)
        self.join()


def write_shards(
    plan: Plan,
    out_dir: Path,
    *,
    max_shard_size: int,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    budget: int | None = None,
    checksums: bool = False,
) -> list[Shard]:
    """Write every step of ``plan`` into ``out_dir`` (which must exist) and return the shards (with their sha256
    when ``checksums``). Also writes ``model.safetensors.index.json`` when there is more than one shard.

    Threads: a reader (inputs into pool buffers), this one (computes), a writer (writes buffers, copies renamed
    tensors file to file), and with ``checksums`` a hasher (reads the shards back through mappings as written).
    ``budget``: bytes of tensor buffers alive at once (default :func:`pool_budget`; raised to that if lower)."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise RuntimeError("big-endian hosts are not supported")
    meta = {"format": "pt", **(metadata or {})}
    shards = assign_shards(plan, max_shard_size, write_order(plan))
    pool = _Pool(max(budget or 0, pool_budget(plan)))
    threads = torch.get_num_threads()
    # the merges' blocks are shared out between MERGE_WORKERS threads of one torch thread each (the same block
    # calls whatever the number of threads); the other ops compute with one torch thread too
    torch.set_num_threads(1)
    executor = ThreadPoolExecutor(MERGE_WORKERS - 1, thread_name_prefix="maskport-merge") if MERGE_WORKERS > 1 \
        else None
    _prefetched.executor = executor
    writer = _Worker("maskport-write")
    hasher = _ShardHasher() if checksums else None
    reader = _Reader([ps for s in shards for ps in s.steps], plan, pool)

    def failed() -> BaseException | None:
        if reader.abort:
            return _Aborted("conversion stopped")
        return writer.error or (hasher.error if hasher else None)

    pool.failed = failed
    fds: dict[str, int] = {}
    copier = _Copier()
    writer.start()
    if hasher:
        hasher.start()
    reader.start()
    try:
        for shard in shards:
            path = out_dir / shard.filename
            header = _header(shard, meta)
            done = hasher.add(shard, path) if hasher else None

            def wrote(n: int, done=done) -> None:
                if done is not None:
                    hasher.wrote(done, n)

            def open_and_write(path=path, header=header, wrote=wrote):
                fds[str(path)] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0),
                                         0o644)
                _write_all(fds[str(path)], memoryview(header))
                wrote(len(header))

            writer.put(open_and_write)
            for ps in shard.steps:
                err = failed()
                if err is not None:
                    raise err
                ld = reader.get(failed)
                assert ld.ps is ps
                _prefetched.step = ld
                try:
                    outs = run_step(ps, plan)
                except RuntimeError as exc:  # e.g. a scaling that overflows the dtype inside the merge
                    pool.give(ld.held, ld.reserve)
                    raise NonFiniteOutput(f"{ps.step.targets[0]}: computing it failed "
                                          f"({' '.join(str(exc).split())[:200]}); nothing was written") from exc
                except BaseException:
                    pool.give(ld.held, ld.reserve)
                    raise
                finally:
                    _prefetched.step = None
                nbytes = sum(i.nbytes for i in ps.output_infos)
                if ld.kind != "passthrough" and not ld.finite:  # a byte copy holds what its input holds
                    check_finite(ps, plan, outs)
                if ld.kind == "passthrough":
                    src, offset, _ = _file_span(ps, plan)

                    def copy(path=path, src=src, offset=offset, nbytes=nbytes, wrote=wrote):
                        copier.copy(src, offset, nbytes, fds[str(path)])
                        wrote(nbytes)

                    writer.put(copy)
                else:
                    release = _Release(pool, ld.held, ld.reserve)
                    views = [_as_bytes(t) for t in outs]  # each view keeps its tensor's memory alive

                    def write(views=views, path=path, wrote=wrote):
                        fd = fds[str(path)]
                        for v in views:
                            _write_all(fd, v)
                            wrote(v.nbytes)

                    writer.put(write, release.done)
                    del views
                del ld, outs
                if progress:
                    progress(nbytes)

            def close(path=path, done=done):
                os.close(fds.pop(str(path)))
                if done is not None:
                    hasher.closed(done)

            writer.put(close)
        if hasher:
            hasher.no_more()
        reader.join()
        writer.stop()
        if writer.error is not None:
            raise writer.error
        if hasher:
            hasher.join()
            if hasher.error is not None:
                raise hasher.error
    except BaseException:
        writer.abort = True
        reader.stop()
        writer.stop()
        if hasher:
            hasher.stop()
        raise
    finally:
        _prefetched.executor = None
        if executor is not None:
            executor.shutdown(wait=True)
        torch.set_num_threads(threads)
        for fd in fds.values():
            os.close(fd)
        fds.clear()
    if len(shards) > 1:
        write_index(out_dir, {t: s.filename for s in shards for ps in s.steps for t in ps.step.targets},
                    plan.total_bytes())
    return shards
