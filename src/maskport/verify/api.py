"""``verify``: run REF and CAND on the same samples, compare, gate, and write the report.

    from maskport.verify.api import verify
    res = verify("exports/my-sa2va", "exports/my-sa2va-awq", "data/val.jsonl", report_dir="reports/awq")
    res.passed, res.exit_code, res.failures, res.summary["dice"]["mean"], res.report  # every number

The two models are never held at once: REF runs over the samples first (its masks are kept packed in memory,
its probability maps in a temporary folder), then CAND. With ``num_processes=N`` (or under ``torchrun``) the
samples are split round-robin by index over N ranks (gloo on CPU, NCCL on GPU: one GPU per rank); every rank
gets every per-sample record, and rank 0 writes a report equal to the one-process report except for ``run``
(timings, process count).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import MaskportError, MissingInput, UnreadableFile
from . import predictor as P
from .compare import (
    GT_POLICY,
    MULTI_SEG_POLICY,
    NO_MASK_POLICY,
    Thresholds,
    compare_sample,
    gate,
    summarize,
    worst_first_key,
)
from .samples import Sample, load_samples

REPORT_SCHEMA = 1


class VerifyRunError(MaskportError):
    """verify could not run to the end (a worker process failed, bad options)."""


@dataclass
class VerifyResult:
    """What ``verify`` returns. ``report`` is exactly what ``report.json`` holds."""

    report: dict[str, Any]
    report_dir: Path | None = None

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])

    @property
    def verdict(self) -> str:
        return self.report["verdict"]

    @property
    def exit_code(self) -> int:
        return int(self.report["exit_code"])

    @property
    def failures(self) -> list[str]:
        return list(self.report["failures"])

    @property
    def gates(self) -> list[dict[str, Any]]:
        return self.report["gates"]

    @property
    def summary(self) -> dict[str, Any]:
        return self.report["summary"]

    @property
    def samples(self) -> list[dict[str, Any]]:
        """Per-sample records, worst first."""
        return self.report["samples"]

    @property
    def json_path(self) -> Path | None:
        return None if self.report_dir is None else self.report_dir / "report.json"

    @property
    def html_path(self) -> Path | None:
        return None if self.report_dir is None else self.report_dir / "index.html"


@dataclass
class _Job:
    ref: Any
    cand: Any
    samples: list[Sample]
    samples_source: dict[str, Any]
    report_dir: Path | None
    thresholds: Thresholds
    device: str = "cpu"
    dtype: str = "auto"
    generation_kwargs: dict | None = None
    max_new_tokens: int | None = None
    mask_threshold: float | None = None
    time_budget: float | None = None
    probabilities: bool = True
    batch_size: int = 1
    overlays_worst: int = 12
    overlays_sample: int = 12
    overlay_seed: int = 0
    progress: bool = True
    models_described: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ public API


def verify(ref, cand, samples, *, report_dir: str | Path | None = None, thresholds: Thresholds | None = None,
           prompt: str | None = None, limit: int | None = None, device: str = "auto", dtype: str = "auto",
           generation_kwargs: dict | None = None, max_new_tokens: int | None = None,
           mask_threshold: float | None = None, time_budget: float | None = None, probabilities: bool = True,
           num_processes: int = 1, batch_size: int = 1, overlays_worst: int = 12, overlays_sample: int = 12,
           overlay_seed: int = 0, progress: bool = True, samples_label: str | None = None) -> VerifyResult:
    """Compare CAND with REF on ``samples``.

    ``ref``/``cand``: export folders, or :class:`~maskport.verify.predictor.InMemoryModel` (one process only).
    ``samples``: a list of :class:`~maskport.verify.samples.Sample`, a JSONL file, or a folder of images (then
    ``prompt`` is required). ``limit`` keeps the first N. ``generation_kwargs`` go to ``generate`` for both
    models (``sequence_bias`` may use token strings as keys, e.g. ``{"[SEG]": 30.0}``). ``time_budget``: seconds
    per sample per model; generation is cut there (``max_time``) and the sample flagged. ``report_dir``: where
    ``report.json``, ``index.html`` and ``images/`` go (None: nothing written). ``samples_label`` describes a
    list of samples in the report (e.g. "refcoco val"). ``device="auto"``: CUDA when available, else CPU.
    ``batch_size``: samples per ``predict_forward`` call (one left-padded batch through the LLM, for models that
    take lists, as maskport exports do; others run one by one); the report is the same as with 1 except where
    padding moves a float tie (see ``predict_batch``), and ``time_budget`` then bounds a whole batch.
    """
    thresholds = thresholds or Thresholds()
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(samples, (str, Path)):
        source = {"kind": "folder" if Path(samples).is_dir() else "jsonl", "source": str(samples)}
        samples = load_samples(samples, prompt=prompt, limit=limit)
    else:
        samples = list(samples)[:limit] if limit is not None else list(samples)
        source = {"kind": "list", "source": samples_label or "list of samples"}
    if not samples:
        raise MissingInput("no samples to verify on")
    source["n"] = len(samples)
    _check_samples(samples)
    if dtype not in P.DTYPES:
        raise MissingInput(f"dtype must be one of {', '.join(P.DTYPES)}, got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MissingInput(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, v in (("max_new_tokens", max_new_tokens), ("time_budget", time_budget)):
        if v is not None and v <= 0:
            raise MissingInput(f"{name} must be positive, got {v}")
    described = {"ref": P.describe(ref, "REF"), "cand": P.describe(cand, "CAND")}
    job = _Job(ref=ref if isinstance(ref, P.InMemoryModel) else str(ref),
               cand=cand if isinstance(cand, P.InMemoryModel) else str(cand), samples=samples,
               samples_source=source, report_dir=Path(report_dir) if report_dir is not None else None,
               thresholds=thresholds, device=device, dtype=dtype, generation_kwargs=generation_kwargs,
               max_new_tokens=max_new_tokens, mask_threshold=mask_threshold, time_budget=time_budget,
               probabilities=probabilities, batch_size=batch_size, overlays_worst=overlays_worst,
               overlays_sample=overlays_sample,
               overlay_seed=overlay_seed, progress=progress, models_described=described)

    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if env_world > 1:  # launched by torchrun (or already inside a process group)
        if num_processes not in (1, env_world):
            raise VerifyRunError(f"--num-processes {num_processes} under torchrun with WORLD_SIZE={env_world}: "
                                 f"leave --num-processes out (torchrun sets the number)")
        return _run_in_process_group(job)
    if num_processes < 1:
        raise MissingInput(f"num_processes must be at least 1, got {num_processes}")
    if num_processes == 1:
        report = _execute(job, rank=0, world=1, collective=None)
        return VerifyResult(report, job.report_dir)
    if isinstance(job.ref, P.InMemoryModel) or isinstance(job.cand, P.InMemoryModel):
        raise VerifyRunError("in-memory models can only be verified with num_processes=1 (pass export folders)")
    return _spawn(job, num_processes)


def _check_samples(samples: list[Sample]) -> None:
    """Every image opens and every GT mask has its image's size (file headers only): bad data fails before any
    model runs."""
    from .samples import open_image

    for s in samples:
        try:
            with open_image(s.image_path, f"sample {s.id}: image") as im:
                w, h = im.size
            gt_hw = None
            if s.gt_mask_path is not None:
                with open_image(s.gt_mask_path, f"sample {s.id}: gt_mask") as g:
                    gt_hw = (g.size[1], g.size[0])
            elif s.gt_segmentations is not None:
                gt_hw = tuple(s.gt_size)
        except (OSError, ValueError) as exc:
            raise UnreadableFile(f"sample {s.id}: cannot read {s.image_path.name} or its GT mask: {exc}") from exc
        if gt_hw is not None and gt_hw != (h, w):
            raise UnreadableFile(f"sample {s.id}: GT mask is {gt_hw[0]} x {gt_hw[1]} but the image is {h} x {w}")


# ------------------------------------------------------------------------------------------------ one rank


def _pack(masks: list[np.ndarray]) -> tuple[np.ndarray, int]:
    if not masks:
        return np.zeros(0, dtype=np.uint8), 0
    return np.packbits(np.stack(masks).reshape(-1)), len(masks)


def _unpack(packed: tuple[np.ndarray, int], hw: tuple[int, int]) -> list[np.ndarray]:
    bits, n = packed
    if n == 0:
        return []
    flat = np.unpackbits(bits, count=n * hw[0] * hw[1]).astype(bool)
    return list(flat.reshape(n, hw[0], hw[1]))


def _bar(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)


def _load_staggered(source, role: str, job: _Job, device: str, rank: int, barrier: Callable | None):
    """Rank 0 loads first (it fills the remote-code module cache); the other ranks then load in parallel."""
    if barrier is not None and rank > 0:
        barrier()
    try:
        return P.load(source, role, device=device, dtype=job.dtype, progress=job.progress and rank == 0)
    finally:
        if barrier is not None and rank == 0:
            barrier()


def _predicted(lm, job: _Job, indices: list[int], label: str, show: bool, options: dict):
    """``(index, image, Prediction)`` for each sample of ``indices``, in order, ``job.batch_size`` at a time."""
    bar = _bar(None, len(indices), label, show) if show else None
    step = max(1, int(job.batch_size))
    for start in range(0, len(indices), step):
        chunk = indices[start:start + step]
        images = [job.samples[i].image() for i in chunk]
        preds = P.predict_many(lm, images, [job.samples[i].prompt for i in chunk], [job.samples[i].id for i in chunk],
                               **options)
        for i, image, pred in zip(chunk, images, preds):
            yield i, image, pred
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def _run_shard(job: _Job, rank: int, world: int, device: str, barrier: Callable | None):
    """REF then CAND over this rank's samples (index ≡ rank mod world). Returns records, packed masks, timings."""
    mine = list(range(rank, len(job.samples), world))
    show = job.progress and rank == 0
    suffix = f" (rank 0 of {world})" if world > 1 else ""
    timings: dict[str, Any] = {"per_sample": {}}
    ref_out: dict[int, tuple] = {}
    masks: dict[int, tuple] = {}
    records = []
    with tempfile.TemporaryDirectory(prefix="maskport-verify-") as tmp:
        tmp = Path(tmp)
        # ---- REF
        lm = _load_staggered(job.ref, "REF", job, device, rank, barrier)
        info = {"ref": lm.info}
        timings["ref_load"] = lm.load_seconds
        gk = P.resolve_generation_kwargs(job.generation_kwargs, lm.tokenizer)
        options = dict(mask_threshold=job.mask_threshold, max_new_tokens=job.max_new_tokens, generation_kwargs=gk,
                       probabilities=job.probabilities, time_budget=job.time_budget)
        t0 = time.perf_counter()
        for i, image, pred in _predicted(lm, job, mine, "REF" + suffix, show, options):
            has_probs = pred.probabilities is not None
            if has_probs and pred.probabilities:
                np.save(tmp / f"ref_{i}.npy", np.stack(pred.probabilities))
            ref_out[i] = (pred.answer, _pack(pred.masks), has_probs, pred.seconds, pred.over_budget)
        timings["ref_predict"] = time.perf_counter() - t0
        seg_token = lm.seg_token
        P.unload(lm)
        del lm
        # ---- CAND
        lm = _load_staggered(job.cand, "CAND", job, device, rank, barrier)
        info["cand"] = lm.info
        timings["cand_load"] = lm.load_seconds
        gk = P.resolve_generation_kwargs(job.generation_kwargs, lm.tokenizer)
        options["generation_kwargs"] = gk
        t0 = time.perf_counter()
        for i, image, cand in _predicted(lm, job, mine, "CAND" + suffix, show, options):
            s = job.samples[i]
            hw = (image.height, image.width)
            answer, packed, has_probs, seconds, over = ref_out.pop(i)
            ref_masks = _unpack(packed, hw)
            ref_probs = None
            if has_probs:
                f = tmp / f"ref_{i}.npy"
                ref_probs = list(np.load(f)) if f.exists() else []
                if f.exists():
                    f.unlink()
            ref = P.Prediction(answer, ref_masks, ref_probs, seconds, over)
            rec = compare_sample(i, s, ref, cand, s.gt_mask() if s.has_gt else None, hw, seg_token=seg_token)
            records.append(rec)
            masks[i] = (packed, _pack(cand.masks))
            timings["per_sample"][i] = {"ref": ref.seconds, "cand": cand.seconds}
        timings["cand_predict"] = time.perf_counter() - t0
        P.unload(lm)
    return records, masks, timings, info


def _select_overlays(ordered: list[dict], n_worst: int, n_sample: int, seed: int) -> list[tuple[int, str]]:
    worst = [r["index"] for r in ordered[:max(0, n_worst)]]
    rest = sorted(r["index"] for r in ordered[max(0, n_worst):])
    picked = sorted(random.Random(seed).sample(rest, min(max(0, n_sample), len(rest))))
    return [(i, "worst") for i in worst] + [(i, "sample") for i in picked]


def _execute(job: _Job, rank: int, world: int, collective) -> dict[str, Any]:
    """Run this rank's share; with ``collective`` (an all-gather of Python objects) merge all ranks'. Every rank
    returns the same report; rank 0 writes it."""
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    device = job.device
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    barrier = (lambda: collective(None)) if collective is not None else None
    records, masks, timings, info = _run_shard(job, rank, world, device, barrier)
    if collective is not None:
        gathered = collective((records, timings, info, device))
        records = [r for g in gathered for r in g[0]]
        all_timings = [g[1] for g in gathered]
        info = gathered[0][2]
        devices = [g[3] for g in gathered]
    else:
        all_timings, devices = [timings], [device]
    records.sort(key=lambda r: r["index"])
    summary = summarize(records)
    gates, failures = gate(summary, job.thresholds)
    ordered = sorted(records, key=worst_first_key)
    chosen = _select_overlays(ordered, job.overlays_worst, job.overlays_sample, job.overlay_seed)
    if job.report_dir is not None and collective is not None:
        mine = {i: masks[i] for i, _ in chosen if i in masks}
        for part in collective(mine):
            masks.update(part)
    models = {}
    for role in ("ref", "cand"):
        m = dict(job.models_described[role])
        for k in ("dtype", "class"):
            m[k] = info[role].get(k)
        m["device"] = job.device
        models[role] = m
    per_sample = {}
    for t in all_timings:
        per_sample.update(t["per_sample"])
    report: dict[str, Any] = {
        "maskport_verify_report": REPORT_SCHEMA,
        "verdict": "pass" if not failures else "fail",
        "passed": not failures,
        "exit_code": 0 if not failures else 1,
        "failures": failures,
        "gates": gates,
        "thresholds": job.thresholds.to_dict(),
        "summary": summary,
        "models": models,
        "settings": {
            "samples": job.samples_source,
            "device": job.device, "dtype": job.dtype,
            "generation_kwargs": P.jsonable(job.generation_kwargs or {}),
            "max_new_tokens": job.max_new_tokens, "mask_threshold": job.mask_threshold,
            "time_budget_s": job.time_budget, "probabilities": job.probabilities, "batch_size": job.batch_size,
            "greedy": not (job.generation_kwargs or {}).get("do_sample", False),
            "multi_seg_policy": MULTI_SEG_POLICY, "gt_policy": GT_POLICY, "no_mask_policy": NO_MASK_POLICY,
            "overlays": {"worst": job.overlays_worst, "sample": job.overlays_sample, "seed": job.overlay_seed},
        },
        "samples": ordered,
        "overlays": [],
        "run": {
            "num_processes": world, "devices": devices, "started": started,
            "backend": None if collective is None else ("nccl" if job.device.startswith("cuda") else "gloo"),
            "seconds": {
                "ref_load": max(t["ref_load"] for t in all_timings),
                "cand_load": max(t["cand_load"] for t in all_timings),
                "ref_predict": max(t["ref_predict"] for t in all_timings),
                "cand_predict": max(t["cand_predict"] for t in all_timings),
            },
            "per_sample_seconds": [{"index": i, **per_sample[i]} for i in sorted(per_sample)],
            "versions": _versions(),
            "host": platform.node(),
        },
    }
    report["run"]["seconds"]["total"] = time.perf_counter() - t_start
    if job.report_dir is not None:
        report["overlays"] = [{"index": i, "group": g, "files": None} for i, g in chosen]
        if rank == 0:
            _write_report(job, report, masks)
            (job.report_dir / "report.json").write_text(json.dumps(report, indent=1))
    if collective is not None:
        collective(None)  # no rank ends before rank 0 has written the report
    return report


def _versions() -> dict[str, str]:
    out = {"maskport": __version__, "python": platform.python_version()}
    for mod in ("torch", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return out


def _write_report(job: _Job, report: dict[str, Any], masks: dict[int, tuple]) -> None:
    from .html import render_overlays, write_html

    out = job.report_dir
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    if images.is_dir():
        for old in images.glob("s*.png"):
            old.unlink()
    for o in report["overlays"]:
        s = job.samples[o["index"]]
        image = s.image()
        hw = (image.height, image.width)
        ref_packed, cand_packed = masks[o["index"]]
        o["files"] = render_overlays(images, o["index"], image, _unpack(ref_packed, hw), _unpack(cand_packed, hw),
                                     s.gt_mask() if s.has_gt else None)
    write_html(report, out / "index.html")


# ------------------------------------------------------------------------------------------------ several ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_in_process_group(job: _Job) -> VerifyResult:
    import torch
    import torch.distributed as dist

    # import the heavy loaders on every rank at once, before the staggered loads (which only read files)
    from transformers import AutoModel, AutoTokenizer  # noqa: F401

    created = False
    if not dist.is_initialized():
        backend = "nccl" if job.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, init_method="env://")
        created = True
    rank, world = dist.get_rank(), dist.get_world_size()

    def collective(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    try:
        report = _execute(job, rank, world, collective)
    finally:
        if created:
            dist.destroy_process_group()
    return VerifyResult(report, job.report_dir)


def _spawn_entry(rank: int, world: int, port: int, job: _Job, exchange: str) -> None:
    """One spawned worker (torch.multiprocessing): torchrun-style env, then the same code as under torchrun."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    exchange = Path(exchange)
    try:
        import torch

        if not job.device.startswith("cuda"):
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        res = _run_in_process_group(job)
        if rank == 0:
            (exchange / "report.json").write_text(json.dumps(res.report))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises one clean error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        (exchange / f"error_{rank}.json").write_text(json.dumps(
            {"type": type(exc).__name__, "message": first, "maskport": isinstance(exc, MaskportError)}))
        raise SystemExit(2)


def _spawn(job: _Job, world: int) -> VerifyResult:
    import torch.multiprocessing as mp

    if job.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < world:
            raise VerifyRunError(f"--num-processes {world} needs {world} GPUs; "
                                 f"{torch.cuda.device_count()} visible")
    exchange = Path(tempfile.mkdtemp(prefix="maskport-verify-ranks-"))
    try:
        try:
            mp.start_processes(_spawn_entry, args=(world, _free_port(), job, str(exchange)), nprocs=world,
                               join=True, start_method="spawn")
        except Exception as exc:  # noqa: BLE001 - a rank failed; its own message is in the exchange folder
            errors = sorted(exchange.glob("error_*.json"))
            if errors:
                # the first rank that failed on its own (others may only have lost their peer)
                details = [json.loads(e.read_text()) for e in errors]
                own = [d for d in details if d["maskport"]] or details
                d = own[0]
                msg = d["message"] if d["maskport"] else f"{d['type']}: {d['message']}"
                raise VerifyRunError(msg) from None
            raise VerifyRunError(f"a verify worker process failed: {str(exc).strip().splitlines()[0]}") from None
        path = exchange / "report.json"
        if not path.is_file():
            raise VerifyRunError("the verify workers ended without a report")
        report = json.loads(path.read_text())
    finally:
        shutil.rmtree(exchange, ignore_errors=True)
    return VerifyResult(report, job.report_dir)
