"""``convert_mmengine_to_hf``: the Python API behind ``maskport convert mmengine-to-hf``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import MaskportError, MissingInput, UnreadableFile, WrongFamily
from ..families import MMENGINE_TO_HF, ConvertOptions, Family, detect_family, get_family
from .plan import Plan, build_plan
from .report import coverage, format_table, plan_entries
from .sources import open_training_checkpoint
from .training_config import TrainingConfig
from ..io import atomic_output_dir, check_output_apart, parse_size
from .writer import write_shards

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class ConversionResult:
    family: str
    plan: Plan
    out_dir: Path | None
    report: dict[str, Any]
    summary: str
    notes: list[str] = field(default_factory=list)


def _check_output_options(out, dtype, max_shard_size, dry_run: bool, overwrite: bool) -> tuple[Path | None, int]:
    """(output folder, shard size in bytes), or a one-line error for a missing/existing ``-o``, an unknown dtype or
    an unreadable shard size."""
    if not dry_run and out is None:
        raise MissingInput("-o/--out is required (or use --dry-run)")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not dry_run and not overwrite:
        raise MissingInput(f"output folder {out_dir} already exists; pass --overwrite to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise MissingInput(f"--dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    try:
        return out_dir, parse_size(max_shard_size)
    except ValueError as exc:
        raise MissingInput(f"--max-shard-size: {exc}") from None


def family_options(fam: Family, command: str, inputs: dict[str, Any], allow_unsafe_pickle: bool) -> ConvertOptions:
    """The family's declared inputs for ``command`` filled from ``inputs`` (CLI options or API keyword arguments;
    ``None`` = not given). An input the family does not take is a one-line error naming its flag."""
    declared = fam.spec.inputs_for(command)
    names = {o.name for o in declared}
    stray = sorted(k for k, v in inputs.items() if v is not None and k not in names)
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        takes = ", ".join(o.flag for o in declared) or "none"
        raise MissingInput(f"{flags}: not an input of family {fam.name} for 'convert {command}' (it takes: {takes})")
    return ConvertOptions(declared, inputs, allow_unsafe_pickle=allow_unsafe_pickle)


try:  # transformers' config classes validate fields with huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError as _StrictError
except ImportError:  # pragma: no cover
    class _StrictError(Exception):
        pass


@contextlib.contextmanager
def structure_errors(family: str, inputs):
    """A backstop for a family's input checks: an input file of the wrong shape that a family's reader did not
    check (a ``KeyError``/``TypeError``/... from valid JSON or pickle holding other types) becomes one
    :class:`UnreadableFile` line naming the inputs and the failing field, instead of a traceback."""
    try:
        yield
    except MaskportError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, _StrictError) as exc:
        names = ", ".join(str(p) for p in inputs if p is not None)
        what = f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else \
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise UnreadableFile(f"an input of family {family} does not have the structure it expects ({what}); "
                             f"inputs: {names}") from exc


def _path_inputs(command: str, inputs: dict[str, Any]) -> list:
    """The given values of the inputs the families declare as paths for ``command``."""
    from ..families import command_inputs

    paths = {o.name for o in command_inputs(command) if o.kind == "path"}
    return [v for k, v in inputs.items() if k in paths and v is not None]


def _training_dtype(source) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for k in source.keys():
        info = source.info(k)
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    return max(counts, key=counts.get) if counts else torch.bfloat16


def convert_mmengine_to_hf(
    ckpt: str | Path,
    *,
    out: str | Path | None,
    family: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "2GB",
    sha256: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    allow_unsafe_pickle: bool = False,
    progress: bool = True,
    log=print,
    **inputs: Any,
) -> ConversionResult:
    """Convert a training checkpoint (mmengine ``.pth``, DeepSpeed ZeRO-1/2/3 folder, or zero_to_fp32's output) into
    an HF folder.

    ``inputs``: the family's declared inputs (``FamilySpec.inputs``), e.g. ``base=``, ``lora_alpha=``;
    ``None`` = not given. Steps:
    1. open the checkpoint (``weights_only`` with the allowlist; memory-mapped) and read its training config
       as data;
    2. pick the family (``family=`` or by the checkpoint's keys), check the inputs against what it declares, and
       let it open them, check they belong to it, and build rules + the export config;
    3. plan from shapes alone and validate coverage (raises before anything is written);
    4. unless ``dry_run``: stream the tensors into sharded safetensors in a temporary folder beside ``out``,
       write config, modeling code, tokenizer, ``conversion_report.json`` and a model card, then rename the
       temporary folder to ``out``.
    """
    t0 = time.time()
    out_dir, shard_bytes = _check_output_options(out, dtype, max_shard_size, dry_run, overwrite)
    if out_dir is not None and not dry_run:  # before anything is opened
        check_output_apart(out_dir, [ckpt, *_path_inputs(MMENGINE_TO_HF, inputs)])
    if family:
        fam = get_family(family)
        family_options(fam, MMENGINE_TO_HF, inputs, allow_unsafe_pickle)  # bad inputs refused before any is opened

    # 1. the training checkpoint
    tc = open_training_checkpoint(ckpt, allow_unsafe_pickle=allow_unsafe_pickle)
    cfg = TrainingConfig.from_text(tc.config_text)
    ckpt_sha = None if dry_run else _Background(tc.sha256)  # hashing overlaps planning and writing

    # 2. the family
    fam = get_family(family) if family else detect_family(tc)
    if family and not fam.accepts(tc):
        raise WrongFamily(f"{ckpt}: this checkpoint's keys do not look like family {fam.name} "
                          f"(keys like {', '.join(sorted(tc.source.keys())[:3])})")
    options = family_options(fam, MMENGINE_TO_HF, inputs, allow_unsafe_pickle)
    with structure_errors(fam.name, [ckpt, *options.paths().values()]):
        prepared = fam.prepare(tc, cfg, options)
    out_dtype = DTYPES[dtype] if dtype else (tc.dtype_hint or _training_dtype(tc.source))

    inputs_report = {"checkpoint": {"path": str(ckpt), "format": tc.format},
                     **{name: {"path": str(p)} for name, p in options.paths().items()}}
    return plan_and_write(prepared, family=fam.name, mapping_version=fam.mapping_version, inputs=inputs_report,
                          training_config_found=dict(cfg.found_in), out_dir=out_dir, out_dtype=out_dtype,
                          shard_bytes=shard_bytes, dry_run=dry_run, progress=progress, t0=t0,
                          input_sha256=("checkpoint", ckpt_sha), checksums=sha256)


def plan_and_write(prepared, *, family: str, mapping_version: str, inputs: dict, training_config_found: dict,
                   out_dir: Path | None, out_dtype: torch.dtype, shard_bytes: int, dry_run: bool, progress: bool,
                   t0: float, input_sha256: tuple[str, Any] | None = None,
                   checksums: bool = False) -> ConversionResult:
    """Steps 3 and 4 of every conversion: plan from shapes and validate coverage (raises before anything is
    written), then stream the tensors into a temporary folder beside ``out_dir``, write the family's files, the
    report and a model card, and rename the folder into place. ``input_sha256``: (an ``inputs`` entry, a
    background hash of that input) to record. ``checksums``: record each shard's sha256 (costs ~1 s per 1.5 GB of
    CPU)."""
    input_paths = [v["path"] for v in inputs.values() if isinstance(v, dict) and v.get("path")]
    if out_dir is not None and not dry_run:
        check_output_apart(out_dir, input_paths)  # before any work; again when the output is opened
    # 3. plan and validate
    plan = build_plan(prepared.rules, prepared.sources, out_dtype=out_dtype,
                      expected=prepared.expected)
    summary = format_table(plan)
    targets, drops = plan_entries(plan)
    report: dict[str, Any] = {
        "maskport_version": __version__,
        "family": family,
        "mapping_version": mapping_version,
        "inputs": inputs,
        "settings": {**prepared.settings, "dtype": str(out_dtype).replace("torch.", ""),
                     "max_shard_size": shard_bytes},
        "training_config_found": training_config_found,
        "notes": prepared.notes,
        "coverage": coverage(plan),
        "targets": targets,
        "dropped": drops,
    }
    if dry_run:
        return ConversionResult(family, plan, None, report, summary, prepared.notes)

    # 4. stream into a temporary folder, then rename into place
    assert out_dir is not None
    _check_free_space(out_dir, plan.total_bytes())
    bg = input_sha256[1] if input_sha256 is not None else None
    try:
        with atomic_output_dir(out_dir, overwrite=True, inputs=input_paths,
                               log=lambda line: print(f"note: {line}", file=sys.stderr)) as tmp:  # (an existing -o was refused unless --overwrite)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=plan.total_bytes(), unit="B", unit_scale=True, unit_divisor=1024,
                           desc="writing tensors", file=sys.stderr)
            shards = write_shards(plan, tmp, max_shard_size=shard_bytes,
                                  metadata={"maskport_family": family, "maskport_version": __version__},
                                  progress=bar.update if bar else None, checksums=checksums)
            if bar:
                bar.close()
            if input_sha256 is not None:
                report["inputs"][input_sha256[0]]["sha256"] = input_sha256[1].result()
            report["shards"] = [{"file": s.filename, "bytes": (tmp / s.filename).stat().st_size,
                                 **({"sha256": s.sha256} if s.sha256 else {}),
                                 "tensors": sum(len(ps.step.targets) for ps in s.steps)} for s in shards]
            report["files"] = prepared.write_files(tmp)
            report["seconds"] = round(time.time() - t0, 3)
            (tmp / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
            (tmp / "README.md").write_text(_model_card(report))
    except BaseException:
        if isinstance(bg, _Background):
            bg.stop()
        raise
    finally:
        for s in prepared.sources.values():
            s.close()
    return ConversionResult(family, plan, out_dir, report, summary, prepared.notes)


def convert_released_folder(
    src: str | Path,
    *,
    command: str,
    out: str | Path | None,
    dtype: str | None = None,
    max_shard_size: str | int = "2GB",
    sha256: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    allow_unsafe_pickle: bool = False,
    progress: bool = True,
    log=print,
    **inputs: Any,
) -> ConversionResult:
    """Convert a released HF folder of a family (a published model folder, often with remote code) into
    maskport's native export (stock transformers classes, quantizable, verifiable), with no training checkpoint.
    ``command``: the convert command whose families are tried (``FamilySpec.released_command``).

    Steps: 1. read the folder's ``config.json`` as JSON (its code is never run) and pick the family that imports
    it; 2. the family splits the folder into its parts and builds rules and the export config; 3-4. plan,
    validate and write exactly as ``convert_mmengine_to_hf`` does."""
    from ..families import detect_released_family
    from ..families._common import read_json

    t0 = time.time()
    src_dir = Path(src)
    if not src_dir.is_dir():
        raise MissingInput(f"released model folder {src_dir} does not exist (or is not a folder)")
    out_dir, shard_bytes = _check_output_options(out, dtype, max_shard_size, dry_run, overwrite)
    if out_dir is not None and not dry_run:
        check_output_apart(out_dir, [src_dir, *_path_inputs(command, inputs)])
    fam = detect_released_family(src_dir, read_json(src_dir / "config.json"), command)
    options = family_options(fam, command, inputs, allow_unsafe_pickle)
    with structure_errors(fam.name, [src_dir, *options.paths().values()]):
        prepared = fam.prepare_released(src_dir, options)
    out_dtype = DTYPES[dtype] if dtype else _training_dtype(prepared.sources["base"])
    return plan_and_write(prepared, family=fam.name, mapping_version=fam.mapping_version,
                          inputs={"released_folder": {"path": str(src_dir)},
                                  **{name: {"path": str(p)} for name, p in options.paths().items()}},
                          training_config_found={}, out_dir=out_dir, out_dtype=out_dtype, shard_bytes=shard_bytes,
                          dry_run=dry_run, progress=progress, t0=t0, checksums=sha256)



def _check_free_space(out_dir: Path, needed: int) -> None:
    """Refuse to start writing when the output's file system has less free space than the tensors need."""
    import shutil

    parent = Path(out_dir).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed:
        raise MissingInput(f"not enough free space for {out_dir}: the tensors need {needed / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB are free on its file system")


class _Background:
    """Runs ``fn(stop=event)`` on a daemon thread; :meth:`result` waits for it and returns (or raises) its outcome;
    :meth:`stop` sets the event and joins the thread (registered with the CLI, so that no thread is left running
    while the process exits)."""

    def __init__(self, fn):
        import threading

        from ..io.exit import register_stopper

        self._out: Any = None
        self._exc: BaseException | None = None
        self._stop = threading.Event()

        def run():
            try:
                self._out = fn(stop=self._stop)
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self._exc = exc

        self._thread = threading.Thread(target=run, name="maskport-sha256-input", daemon=True)
        self._thread.start()
        register_stopper(self.stop)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def result(self):
        self._thread.join()
        if self._exc is not None:
            raise self._exc
        return self._out


def _model_card(report: dict) -> str:
    inputs = report["inputs"]
    if "checkpoint" in inputs:
        ck = inputs["checkpoint"]
        origin = "\n".join([f"- source checkpoint: `{Path(ck['path']).name}` ({ck['format']}), sha256 "
                             f"`{ck.get('sha256', 'n/a')}`"] +
                            [f"- {name.replace('_', ' ')}: `{v['path']}`" for name, v in inputs.items()
                             if name != "checkpoint"])
    else:
        origin = "\n".join(f"- {name.replace('_', ' ')}: `{v['path']}`" for name, v in inputs.items())
    cov = report["coverage"]
    rows = "\n".join(f"| {n} | {c['tensors']} | {c['used']} | {c['dropped']} | {c['unaccounted']} |"
                     for n, c in cov["sources"].items())
    shards = "\n".join(f"| {s['file']} | {s['bytes']} | " + (f"`{s['sha256']}`" if s.get("sha256") else
                        "not computed (convert with --sha256)") + " |" for s in report.get("shards", []))
    return f"""---
library_name: transformers
tags: [maskport, segmentation, {report['family']}]
---
# Converted with maskport {report['maskport_version']}

- family: `{report['family']}` (mapping version {report['mapping_version']})
{origin}
- dtype: {report['settings']['dtype']}; LoRA: {report['settings'].get('lora')}

## Use

```python
from transformers import AutoModel, AutoTokenizer
from PIL import Image
model = AutoModel.from_pretrained("<this folder>", trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained("<this folder>", trust_remote_code=True)
out = model.predict_forward(image=Image.open("img.png").convert("RGB"),
                            text="<image>Please segment the object.", tokenizer=tok)
out["prediction"], out["prediction_masks"]  # str, [bool array (1, H, W) per [SEG]]
```

## Coverage

Every source tensor is used or dropped with a reason; every target tensor is produced once
(`conversion_report.json` lists each one).

| source | tensors | used | dropped | unaccounted |
|---|---|---|---|---|
{rows}

Targets: {cov['targets']}. Ops: {cov['ops']}.

## Shards

| file | bytes | sha256 |
|---|---|---|
{shards}
"""
