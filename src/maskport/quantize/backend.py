"""GPTQModel, the one quantization backend (GPTQ and AWQ), and the quirks of its pinned version.

Everything that touches ``gptqmodel`` is here, so that a version bump is reviewed in one file:

- ``GPTQMODEL_CPU_WORKERS``: GPTQModel sizes its CPU worker pool as ``(cores + 1) // 2`` when the variable is
  unset, i.e. one worker on a 2-core machine, where its pipelined stages wait on each other. We set it to at
  least 2 before ``gptqmodel`` is imported (a value the user exported is kept).
- ``offload_to_disk``: on by default in GPTQModel; it writes every finished layer to a temporary folder and reads
  it back, which made a 2-layer CPU run 10x slower (116 s vs 11 s). maskport holds the model in memory anyway,
  so it is off unless ``offload_to_disk=True`` is asked for (very large models on small hosts).
- AWQ on CPU: the quantize-time kernel must be ``BACKEND.AWQ_TORCH`` (the GEMM kernel is CUDA-only).
- AWQ clip search (``AWQProcessor._compute_best_clip``) asserts ``out_features % 64 == 0``; real Qwen2.5-VL
  projections satisfy it, tiny test models do not. Linears that would fail the assertion are left out of the
  clip search (they keep AWQ's scaling, as ``q_proj``/``k_proj`` always do) instead of crashing the run.
- Log files: GPTQModel writes one per run into ``./logs`` of the current directory; they go to maskport's
  temporary work folder instead.
- Calibration batches: the Qwen2.5-VL and InternVL model definitions build calibration batches from chat
  "conversations" with their own processor. maskport builds them with the export's own preprocessing (``calibration.py``), so the
  model instance's ``prepare_dataset`` is replaced by the identity for the batches we pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import MaskportError, MissingInput

PINNED_GPTQMODEL = "7.6.0"
# The decoder linears of a layer, as GPTQModel's ``module_tree`` for qwen2_5_vl and internvl lists them.
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_CLIP_MULTIPLE = 64


class QuantizeError(MaskportError):
    """Quantization could not be done (missing backend, unsupported settings, failed run)."""


@dataclass
class QuantSettings:
    method: str = "gptq"          # gptq | awq
    bits: int = 4                 # 4 | 8
    group_size: int = 128         # -1: one group per column
    desc_act: bool = False        # GPTQ act-order
    sym: bool | None = None       # None: GPTQ sym, AWQ zero-point (asymmetric)
    damp: float = 0.05            # GPTQ damp_percent
    awq_format: str = "gemm"      # AWQ checkpoint format
    device: str = "cpu"
    offload_to_disk: bool = False
    kernel: str | None = None     # GPTQModel BACKEND value (e.g. gptq_triton, awq_gemm_triton); None: choose

    def resolved_sym(self) -> bool:
        if self.sym is not None:
            return bool(self.sym)
        return self.method == "gptq"

    def check(self) -> None:
        if self.method not in ("gptq", "awq"):
            raise QuantizeError(f"--method must be gptq or awq, got {self.method!r}")
        if self.bits not in (4, 8):
            raise QuantizeError(f"--bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise QuantizeError(f"--group-size must be positive or -1, got {self.group_size}")
        if not 0.0 < self.damp < 1.0:
            raise QuantizeError(f"--damp must be between 0 and 1, got {self.damp}")
        if self.method == "awq" and self.desc_act:
            raise QuantizeError("--desc-act is a GPTQ option; AWQ checkpoints have no act-order")
        if self.awq_format not in ("gemm", "gemv"):
            raise QuantizeError(f"--awq-format must be gemm or gemv, got {self.awq_format!r}")


def _prepare_env() -> None:
    cores = os.cpu_count() or 1
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (cores + 1) // 2)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def import_gptqmodel():
    """Import gptqmodel with maskport's environment; a clear error when it is missing."""
    _prepare_env()
    try:
        import gptqmodel
    except ImportError as exc:
        raise MissingInput("quantization needs GPTQModel: pip install 'maskport[quant]' "
                           f"(gptqmodel=={PINNED_GPTQMODEL}, optimum) -- import failed: {exc}") from exc
    return gptqmodel


def versions() -> dict[str, str | None]:
    out = {}
    for name in ("gptqmodel", "optimum", "transformers", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_versions() -> list[str]:
    """Warnings (not errors) for versions other than the ones the quirks above were checked against."""
    v = versions()
    warnings = []
    if v["gptqmodel"] != PINNED_GPTQMODEL:
        warnings.append(f"gptqmodel {v['gptqmodel']} is installed; maskport is tested with {PINNED_GPTQMODEL}")
    if v["optimum"] is None:
        warnings.append("optimum is not installed: transformers cannot load GPTQ checkpoints without it "
                        "(pip install 'maskport[quant]')")
    return warnings


def check_shapes(settings: QuantSettings, linear_shapes: dict[str, tuple[int, int]]) -> None:
    """Every decoder linear must split into whole groups (and, for packing, whole int32 words)."""
    problems = []
    for name, (out_f, in_f) in linear_shapes.items():
        if settings.group_size > 0 and in_f % settings.group_size:
            problems.append(f"{name}: in_features={in_f} is not a multiple of --group-size {settings.group_size}")
        if (out_f * settings.bits) % 32 and settings.method == "awq":
            problems.append(f"{name}: out_features={out_f} cannot be packed at {settings.bits} bits")
    if problems:
        head = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise QuantizeError(f"the language model's linears do not fit these settings: {head}. "
                            f"Use a --group-size that divides the hidden sizes (or -1)")


def _patch_awq_clip_search() -> None:
    from gptqmodel.looper import awq_processor

    cls = awq_processor.AWQProcessor
    if getattr(cls, "_maskport_clip_patch", False):
        return
    original = cls._search_best_clip

    def _search_best_clip(self, layer, named_linears, input_feat):
        eligible = {name: mod for name, mod in named_linears.items()
                    if int(mod.weight.shape[0]) % AWQ_CLIP_MULTIPLE == 0}
        return original(self, layer, eligible, input_feat)

    cls._search_best_clip = _search_best_clip
    cls._maskport_clip_patch = True


def _redirect_logs(folder: Path) -> None:
    """GPTQModel 7.6 writes per-run log files to ``./logs`` of the current directory; put them in our
    temporary work folder instead (removed with it)."""
    from gptqmodel.looper import loop_processor

    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = Path(folder)


def make_quantize_config(settings: QuantSettings):
    import_gptqmodel()
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    kw: dict[str, Any] = {"bits": settings.bits, "group_size": settings.group_size, "sym": settings.resolved_sym(),
                              "device": settings.device, "offload_to_disk": settings.offload_to_disk}
    if settings.method == "gptq":
        kw.update(desc_act=settings.desc_act, damp_percent=settings.damp, format=FORMAT.GPTQ)
    else:
        kw.update(method=METHOD.AWQ, format=FORMAT.GEMM if settings.awq_format == "gemm" else FORMAT.GEMV)
    return QuantizeConfig(**kw)


def resolve_kernel(name: str):
    """GPTQModel's ``BACKEND`` member named ``name`` (e.g. ``gptq_triton``), or a QuantizeError listing them."""
    import_gptqmodel()
    from gptqmodel import BACKEND

    try:
        return BACKEND(name)
    except ValueError:
        raise QuantizeError(f"unknown GPTQModel kernel {name!r}; known: {', '.join(b.value for b in BACKEND)}") \
            from None


def quantize_mllm(stage_dir: Path, out_dir: Path, calibration: list[dict], settings: QuantSettings,
                  log=print) -> dict[str, Any]:
    """Quantize the MLLM folder ``stage_dir`` (HF layout, with its processor) with GPTQModel and save the
    result (GPTQModel's own format: HF config + ``quantize_config.json`` + packed safetensors) to ``out_dir``.
    Only the decoder layers (``model.language_model.layers.*``) are quantized: that is GPTQModel's module tree
    for Qwen2.5-VL and InternVL; the vision tower, projector, embeddings and lm_head are never touched."""
    import_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel

    for w in check_versions():
        log(f"warning: {w}")
    qcfg = make_quantize_config(settings)
    on_cpu = str(settings.device).startswith("cpu")
    backend = BACKEND.AUTO
    if settings.method == "awq":
        _patch_awq_clip_search()
        if on_cpu:
            backend = BACKEND.AWQ_TORCH
    if settings.kernel:  # e.g. where GPTQModel's automatic choice needs a kernel it cannot build (offline Hopper)
        backend = resolve_kernel(settings.kernel)
    _redirect_logs(Path(out_dir).parent / "gptqmodel-logs")
    # the accelerator is named by QuantizeConfig.device only: GPTQModel loads the unquantized model on the CPU and
    # moves one decoder layer at a time to the device (passing device/device_map here as well is an error)
    qmodel = GPTQModel.load(str(stage_dir), qcfg)
    # our batches are ready (the export's own preprocessing); skip GPTQModel's conversation builder
    qmodel.prepare_dataset = lambda calibration_dataset, **_: calibration_dataset
    try:
        qmodel.quantize(calibration, backend=backend)
    except AssertionError as exc:  # GPTQModel reports unsupported shapes with bare asserts
        raise QuantizeError(f"GPTQModel failed ({type(exc).__name__}: {exc}); run with --debug for the "
                            f"traceback") from exc
    qmodel.save(str(out_dir))
    return {"backend": str(backend), "quantize_config": qcfg.to_dict() if hasattr(qcfg, "to_dict") else None}
