"""``quantize_export``: a maskport export -> the same export with a 4/8-bit GPTQ or AWQ language model.

    from maskport.quantize.api import quantize_export
    res = quantize_export("exports/my-sa2va", "exports/my-sa2va-awq", method="awq", calib="data/train.jsonl",
                          verify_samples="data/val.jsonl")
    res.out_dir, res.report["sizes"], res.verify  # the verify result when verify_samples was given

Steps:
1. load the unquantized export (``AutoModel``, trust_remote_code) and build calibration batches from the user's
   samples with its own preprocessing (``calibration.py``);
2. save its ``mllm`` (a plain ``Qwen2_5_VLForConditionalGeneration`` or ``InternVLForConditionalGeneration``:
   the family's ``targets`` module says how) + tokenizer + processor to a staging folder and quantize it with
   GPTQModel (``backend.py``): only ``model.language_model.layers.*`` linears;
3. write the output folder (``folder.py``): packed decoder linears + every other tensor copied from the export,
   ``config.json`` with a transformers-readable ``quantization_config`` whose ``modules_to_not_convert`` names
   the full prefixes that stay floating point, ``quantization_report.json``, the model card;
4. optionally run ``maskport verify`` (quantized vs unquantized, and vs GT when present) and fail on its gate.

Output goes to a hidden temporary folder beside ``out`` and is renamed into place at the end.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import MaskportError, MissingInput, UnreadableFile
from ..io import atomic_output_dir, check_output_apart, parse_size
from ..io.atomic import clean_stale, output_lock
from .backend import QuantizeError, QuantSettings, check_shapes, quantize_mllm, versions
from .calibration import build_calibration
from .folder import (
    _tensor_info,
    composite_quantization_config,
    copy_side_files,
    mark_standalone_exclusions,
    model_card_section,
    param_bytes,
    plan_tensors,
    weight_file_bytes,
    write_config,
    write_tensors,
)
from .targets import QuantTarget, target_for


class VerifyGateFailed(MaskportError):
    """The quantized export was written but failed ``maskport verify``'s gate."""

    exit_code = 1


@dataclass
class QuantizeResult:
    out_dir: Path
    report: dict[str, Any]
    verify: Any = None          # maskport.verify.api.VerifyResult when verify_samples was given
    messages: list[str] = field(default_factory=list)


def _check_export(export_dir: Path) -> tuple[dict, QuantTarget]:
    cfg_path = export_dir / "config.json"
    if not cfg_path.is_file():
        raise MissingInput(f"{export_dir} is not an export folder (no config.json)")
    from ..io.jsonfile import read_json_file

    cfg = read_json_file(cfg_path, what="export config")
    index = export_dir / "model.safetensors.index.json"
    if index.is_file():
        from ..io.shards import read_weight_map

        read_weight_map(index)  # shard names stay inside the folder, every shard present
    if not isinstance(cfg.get("model_type"), (str, type(None))):
        raise UnreadableFile(f"{cfg_path}: field 'model_type' should be a string")
    target = target_for(cfg.get("model_type"), str(export_dir))
    if cfg.get("quantization_config"):
        if not isinstance(cfg["quantization_config"], dict):
            raise UnreadableFile(f"{cfg_path}: field 'quantization_config' should be an object")
        raise MissingInput(f"{export_dir} is already quantized ({cfg['quantization_config'].get('quant_method')}); "
                           f"quantize the unquantized export")
    return cfg, target


def _load_samples(path):
    from ..verify import samples as S

    loader = getattr(S, "load_samples", None)
    return loader(path) if loader is not None else S.load_jsonl(path)


def _resolve_device(device: str) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return "cuda:0"
    return device


def _decoder_linear_shapes(model) -> dict[str, tuple[int, int]]:
    from .backend import DECODER_LINEARS

    out = {}
    for i, layer in enumerate(model.mllm.model.language_model.layers):
        for name in DECODER_LINEARS:
            mod = layer.get_submodule(name)
            out[f"layers.{i}.{name}"] = (int(mod.out_features), int(mod.in_features))
    return out


def quantize_export(export_dir, out, *, method: str = "gptq", bits: int = 4, group_size: int = 128,
                    desc_act: bool = False, sym: bool | None = None, damp: float = 0.05, awq_format: str = "gemm",
                    calib=None, calib_samples: int = 128, max_seq_len: int = 2048, calib_text_only: bool = False,
                    device: str = "auto", offload_to_disk: bool = False, max_shard_size: str | int = "2GB",
                    kernel: str | None = None,
                    save_mllm=None, verify_samples=None, verify_options: dict | None = None,
                    overwrite: bool = False, log=print) -> QuantizeResult:
    """Quantize the language model of the export ``export_dir`` into ``out``; see the module docstring."""
    import torch

    t_start = time.time()
    export_dir, out = Path(export_dir), Path(out)
    _, target = _check_export(export_dir)
    if method in target.unsupported_methods:
        raise MissingInput(f"--method {method} is not available for this export: {target.unsupported_methods[method]}")
    settings = QuantSettings(method=method, bits=int(bits), group_size=int(group_size), desc_act=bool(desc_act),
                             sym=sym, damp=float(damp), awq_format=awq_format, device=_resolve_device(device),
                             offload_to_disk=bool(offload_to_disk), kernel=kernel)
    settings.check()
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise MissingInput(f"--max-shard-size: {exc}") from None
    if calib is None and not calib_text_only:
        raise MissingInput("calibration samples are required: --calib samples.jsonl (image + prompt [+ answer]); "
                           "--calib-text-only calibrates without images (worse masks), only when asked for")
    samples = _load_samples(calib) if calib is not None else None
    inputs = [export_dir, calib, verify_samples]
    check_output_apart(out, inputs)
    if save_mllm is not None:
        check_output_apart(Path(save_mllm), [*inputs, out])
        check_output_apart(out, [save_mllm])
    if out.exists():
        if not overwrite:
            raise MissingInput(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        clean_stale(out)
        return _quantize_locked(export_dir, out, target=target, settings=settings, shard_bytes=shard_bytes,
                                samples=samples, calib=calib, calib_samples=calib_samples, max_seq_len=max_seq_len,
                                calib_text_only=calib_text_only, save_mllm=save_mllm,
                                verify_samples=verify_samples, verify_options=verify_options,
                                overwrite=overwrite, log=log, t_start=t_start, inputs=inputs)


def _quantize_locked(export_dir, out, *, target, settings, shard_bytes, samples, calib, calib_samples, max_seq_len,
                     calib_text_only, save_mllm, verify_samples, verify_options, overwrite, log, t_start, inputs):
    import torch

    from ..verify import samples as _samples_mod  # noqa: F401  (fail early if verify's loader is unavailable)
    from .backend import import_gptqmodel, resolve_kernel

    import_gptqmodel()  # a missing backend is reported before the model is loaded
    if settings.kernel:
        resolve_kernel(settings.kernel)  # and so is a kernel name GPTQModel does not know
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.maskport-quant-", dir=out.parent))
    try:
        # 1. load + calibration ------------------------------------------------------------------------------
        from transformers import AutoModel, AutoTokenizer

        t0 = time.time()
        model = AutoModel.from_pretrained(export_dir, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
        check_shapes(settings, _decoder_linear_shapes(model))
        try:
            calib_set = build_calibration(model, tokenizer, samples, n_samples=calib_samples,
                                          max_seq_len=max_seq_len, text_only=calib_text_only, log=log)
        except ValueError as exc:
            raise MissingInput(str(exc)) from exc
        if calib is not None:
            calib_set.stats["file"] = str(calib)
        stage = work / "mllm-stage"
        target.stage(model, tokenizer, stage)
        del model
        gc.collect()
        t_prep = time.time() - t0

        # 2. quantize -----------------------------------------------------------------------------------------
        qdir = work / "mllm-quantized"
        if settings.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        backend_info = quantize_mllm(stage, qdir, calib_set.batches, settings, log=log)
        t_quant = time.time() - t0
        peak_gpu = int(torch.cuda.max_memory_allocated()) if settings.device.startswith("cuda") else None
        shutil.rmtree(stage, ignore_errors=True)

        # 3. write the composite folder (hidden beside -o, renamed into place at the end) ----------------------
        with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as partial:
            entries, qmods = plan_tensors(export_dir, qdir)
            shards = write_tensors(entries, partial, shard_bytes)
            qc = composite_quantization_config(qdir, settings.method, target)
            copy_side_files(export_dir, partial, skip=("config.json",))
            provenance = {"method": settings.method, "bits": settings.bits, "group_size": settings.group_size,
                          "source_export": str(export_dir), "maskport_version": __version__,
                          "gptqmodel_version": versions()["gptqmodel"]}
            write_config(export_dir, partial, qc, provenance)
            before_info, after_info = _tensor_info(export_dir), _tensor_info(partial)
            report = {
                "schema": 1,
                "tool": {"maskport": __version__, **versions()},
                "source_export": str(export_dir.resolve()),
                "settings": {"method": settings.method, "bits": settings.bits, "group_size": settings.group_size,
                             "desc_act": settings.desc_act, "sym": settings.resolved_sym(), "damp": settings.damp,
                             "awq_format": settings.awq_format if settings.method == "awq" else None,
                             "device": settings.device, "offload_to_disk": settings.offload_to_disk},
                "quantization_config": qc,
                "family": target.spec.name,
                "excluded_prefixes": list(target.excluded_prefixes),
                "quantized_modules_count": len(qmods),
                "quantized_modules": qmods,
                "calibration": calib_set.stats,
                "sizes": {"before": {"files_bytes": weight_file_bytes(export_dir),
                                     "param_bytes": param_bytes(before_info, target)},
                          "after": {"files_bytes": weight_file_bytes(partial),
                                    "param_bytes": param_bytes(after_info, target), "shards": shards}},
                "timings_s": {"load_and_calibration": round(t_prep, 2), "quantize": round(t_quant, 2)},
                "peak_gpu_bytes": peak_gpu,
                "backend": {k: (str(v) if not isinstance(v, (dict, list, type(None))) else v)
                            for k, v in backend_info.items() if k != "quantize_config"},
            }
            card = partial / "README.md"
            card.write_text((card.read_text() if card.is_file() else "") + model_card_section(report))
            if save_mllm is not None:
                save_mllm = Path(save_mllm)
                if save_mllm.exists():
                    if not overwrite:
                        raise MissingInput(f"{save_mllm} exists; pass --overwrite to replace it")
                    shutil.rmtree(save_mllm)
                shutil.copytree(qdir, save_mllm)
                mark_standalone_exclusions(save_mllm, settings.method, target)
                report["standalone_mllm"] = str(save_mllm)
            report["timings_s"]["total"] = round(time.time() - t_start, 2)
            (partial / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = QuantizeResult(out, report)
    # 4. verify ----------------------------------------------------------------------------------------------
    if verify_samples is not None:
        result.verify = run_verify(export_dir, out, verify_samples, verify_options or {}, log=log)
        report["verify"] = {"report_dir": str(result.verify.report_dir) if result.verify.report_dir else None,
                            "passed": result.verify.passed, "verdict": result.verify.verdict,
                            "failures": result.verify.failures}
        (out / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if not result.verify.passed:
            raise VerifyGateFailed(f"the quantized export {out} failed verify: "
                                   + "; ".join(result.verify.failures or [result.verify.verdict])
                                   + f" (report: {result.verify.report_dir})")
    return result


def verify_report_dir(out: Path) -> Path:
    """Where the verify report of ``out`` goes: beside the output folder."""
    out = Path(out)
    return out.parent / f"{out.name}.verify"


def run_verify(export_dir: Path, out: Path, samples, options: dict, log=print):
    """``maskport verify REF=export CAND=quantized SAMPLES`` through verify's Python API."""
    from ..verify.api import verify
    from ..verify.compare import Thresholds

    opts = dict(options)
    thr = {k: opts.pop(k) for k in ("min_dice", "max_giou_drop", "max_text_mismatch") if k in opts}
    report_dir = Path(opts.pop("report_dir", None) or verify_report_dir(out))
    opts.setdefault("device", "auto")
    log(f"verify: {export_dir} (REF) vs {out} (CAND) on {samples}")
    return verify(str(export_dir), str(out), samples, report_dir=report_dir,
                  thresholds=Thresholds(**thr) if thr else None, **opts)


__all__ = [
    "QuantizeError",
    "QuantizeResult",
    "VerifyGateFailed",
    "quantize_export",
    "run_verify",
    "verify_report_dir",
]
