"""Model replicas and the dynamic batcher behind ``maskport serve``.

A :class:`Replica` is one loaded export (``AutoModel.from_pretrained(..., trust_remote_code=True)``) on one device,
with one thread that runs it. The :class:`Batcher` keeps one queue; each replica's worker takes the first waiting
request and whatever else is queued already; under concurrent traffic (more than one request in this round or in
the worker's last batch) it also waits up to ``max_wait_s`` for more (up to ``max_batch``), while a lone client's
request runs at once. It groups them by the settings a batch shares
(threshold, max_new_tokens, return_probabilities) and runs each group through the export's batched
``predict_batch`` (a group of one through ``predict_forward``). Masks are encoded to COCO RLE in the worker thread.

A request that times out or whose client disconnects is cancelled: while it waits in the queue it is skipped (its
slot is free at once); a batch already running on the model finishes, and its result is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import rle
from ..errors import MaskportError
from ..io.jsonfile import read_json_file


class QueueFull(Exception):
    pass


class RequestTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


@dataclass
class Job:
    image: Any  # PIL.Image or None
    prompt: str
    threshold: float | None
    max_new_tokens: int | None
    return_probabilities: bool
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None

    @property
    def key(self) -> tuple:
        return (self.threshold, self.max_new_tokens, self.return_probabilities)


def probabilities_payload(p: np.ndarray) -> dict[str, Any]:
    """A probability map as JSON: float16, row-major, little-endian, base64 (the client decodes it)."""
    a = np.asarray(p, dtype="<f2")
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    return {"dtype": "float16", "shape": [int(a.shape[0]), int(a.shape[1])],
            "data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")}


def result_payload(out: dict[str, Any]) -> dict[str, Any]:
    """``predict_forward``'s dict -> the API's ``{prediction, masks: [{seg_index, size, counts}]}``."""
    masks = []
    probs = out.get("prediction_probabilities")
    for i, m in enumerate(out.get("prediction_masks") or []):
        enc = rle.encode(m)
        entry: dict[str, Any] = {"seg_index": i, "size": enc["size"], "counts": enc["counts"]}
        if probs is not None:
            entry["probabilities"] = probabilities_payload(probs[i])
        masks.append(entry)
    return {"prediction": out["prediction"], "masks": masks}


class Replica:
    """One model on one device, run by one thread."""

    def __init__(self, model, tokenizer, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"maskport-{device}")
        self.batched = callable(getattr(model, "predict_batch", None))

    @classmethod
    def load(cls, export_dir: str | Path, device: str = "cpu") -> "Replica":
        from transformers import AutoModel, AutoTokenizer

        kw: dict[str, Any] = {"trust_remote_code": True}
        if device != "cpu":
            kw["device_map"] = {"": device}
        model = AutoModel.from_pretrained(str(export_dir), **kw).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(export_dir), trust_remote_code=True)
        return cls(model, tokenizer, device)

    def dtype(self) -> str:
        for p in self.model.parameters():
            if p.is_floating_point():
                return str(p.dtype).replace("torch.", "")
        return "unknown"

    def run(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Predict a group of jobs that share their settings (called in this replica's thread)."""
        import torch

        thr, max_new, probs = jobs[0].key
        with torch.inference_mode():
            if len(jobs) == 1 or not self.batched:
                outs = [self.model.predict_forward(image=j.image, text=j.prompt, tokenizer=self.tokenizer,
                                                   mask_threshold=thr, max_new_tokens=max_new,
                                                   return_probabilities=probs) for j in jobs]
            else:
                outs = self.model.predict_batch([j.image for j in jobs], [j.prompt for j in jobs],
                                                tokenizer=self.tokenizer, mask_threshold=thr,
                                                max_new_tokens=max_new, return_probabilities=probs)
        return [result_payload(o) for o in outs]


def visible_devices(device: str) -> list[str]:
    """``auto``: one replica per visible GPU, else CPU; ``cuda``: every visible GPU; ``cpu``; ``cuda:N``."""
    import torch

    if device == "cpu" or device.startswith("cuda:"):
        return [device]
    n = torch.cuda.device_count()
    if device == "cuda" and n == 0:
        raise RuntimeError("--device cuda but no CUDA device is visible")
    return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]


def model_info(export_dir: str | Path, replicas: list[Replica]) -> dict[str, Any]:
    """What ``GET /v1/model`` says: family, dtype, quantization, the source checkpoint's sha256."""
    export_dir = Path(export_dir)

    def read(name):
        try:
            return read_json_file(export_dir / name)
        except MaskportError:
            return {}

    cfg, report, qreport = read("config.json"), read("conversion_report.json"), read("quantization_report.json")
    qc = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else None
    ckpt = (report.get("inputs") or {}).get("checkpoint") if isinstance(report.get("inputs"), dict) else None
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    return {
        "export": export_dir.name,
        "family": report.get("family") or qreport.get("family"),
        "model_type": cfg.get("model_type"),
        "dtype": replicas[0].dtype() if replicas else None,
        "quantization": ({"method": qc.get("quant_method"), "bits": qc.get("bits")} if qc else None),
        "source_checkpoint": {"file": Path(str(ckpt["path"])).name if ckpt.get("path") else None,
                              "format": ckpt.get("format"), "sha256": ckpt.get("sha256")},
        "maskport_version": report.get("maskport_version"),
        "replicas": [r.device for r in replicas],
        "batched_predict": bool(replicas and replicas[0].batched),
    }


class Batcher:
    """Dynamic batching over one queue and one worker per replica (start it inside the server's event loop)."""

    def __init__(self, replicas: list[Replica], max_batch: int = 8, max_wait_s: float = 0.01, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait >= 0")
        self.replicas = replicas
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.pending = 0
        self.stats = {"requests": 0, "batches": 0, "batched_requests": 0, "cancelled": 0, "max_batch_seen": 0}
        self._lock = threading.Lock()
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._worker(r)) for r in self.replicas]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass

    async def submit(self, job: Job, timeout_s: float,
                     is_disconnected: Callable[[], Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Queue ``job`` and wait for its result: ``(payload, timings)``. Raises QueueFull, RequestTimeout,
        ClientGone; the job's slot is freed on every exit."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        if self.pending >= self.max_queue:
            raise QueueFull(f"{self.pending} requests are queued or running (--max-queue {self.max_queue})")
        self.pending += 1
        self.stats["requests"] += 1
        deadline = time.perf_counter() + timeout_s
        try:
            self._queue.put_nowait(job)
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise RequestTimeout(f"no result within {timeout_s:g} s")
                done, _ = await asyncio.wait({job.future}, timeout=min(0.2, left))
                if done:
                    return job.future.result()
                if is_disconnected is not None and await is_disconnected():
                    raise ClientGone("client disconnected")
        finally:
            self.pending -= 1
            if not job.future.done():
                job.future.cancel()
                self.stats["cancelled"] += 1

    async def _next_live(self, timeout: float | None) -> Job | None:
        while True:
            if timeout is None:
                job = await self._queue.get()
            else:
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    return None
            if not job.future.done():
                return job

    async def _worker(self, replica: Replica) -> None:
        loop = asyncio.get_running_loop()
        last_size = 1
        while True:
            first = await self._next_live(None)
            batch = [first]
            while len(batch) < self.max_batch and not self._queue.empty():  # what is queued already, no wait
                job = self._queue.get_nowait()
                if not job.future.done():
                    batch.append(job)
            # wait for more only under concurrent traffic (several requests this round, or in the last batch): a
            # lone client's request runs at once instead of paying max_wait on every call
            concurrent = len(batch) > 1 or last_size > 1
            until = loop.time() + (self.max_wait_s if concurrent else 0.0)
            while len(batch) < self.max_batch:
                left = until - loop.time()
                if left <= 0:
                    break
                job = await self._next_live(left)
                if job is None:
                    break
                batch.append(job)
            last_size = len(batch)
            groups: dict[tuple, list[Job]] = {}
            for j in batch:
                groups.setdefault(j.key, []).append(j)
            for jobs in groups.values():
                jobs = [j for j in jobs if not j.future.done()]
                if not jobs:
                    continue
                t0 = time.perf_counter()
                for j in jobs:
                    j.started = t0
                try:
                    outs = await loop.run_in_executor(replica.executor, replica.run, jobs)
                except Exception as exc:  # noqa: BLE001 - handed to each request as its error
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(exc)
                    continue
                t1 = time.perf_counter()
                self.stats["batches"] += 1
                self.stats["batched_requests"] += len(jobs)
                self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(jobs))
                for j, out in zip(jobs, outs):
                    if not j.future.done():
                        j.future.set_result((out, {"queue_ms": round((t0 - j.enqueued) * 1e3, 2),
                                                   "inference_ms": round((t1 - t0) * 1e3, 2),
                                                   "batch_size": len(jobs), "device": replica.device}))
