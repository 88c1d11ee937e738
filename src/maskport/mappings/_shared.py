"""Helpers every family uses: reading JSON, SAM2 inputs, LoRA settings, tokenizer and generation files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..convert.rules import lora_scaling
from ..convert.sources import TrainingCheckpoint, open_sam2_checkpoint
from ..convert.training_config import Opaque, TrainingConfig
from ..errors import MissingInput, ShapeMismatch, UnreadableFile
from . import sam2_meta_to_hf as sam2map
from .registry import ConvertOptions


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInput(f"{path} is missing") from None
    except ValueError as exc:
        raise UnreadableFile(f"{path}: not valid JSON ({exc})") from exc


EXPORT_DIR = Path(__file__).resolve().parent.parent / "export"


SAM2_NORMALIZATIONS = ("sa2va", "exact")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def sam2_normalization(mode: str) -> dict[str, list[float]]:
    """The SAM2 input normalisation an export config carries (``sam2_pixel_mean``/``sam2_pixel_std``).

    ``"sa2va"`` (the default): ImageNet's mean/std *rounded to bfloat16*, which is what Sa2VA computes: its SAM2
    wrapper builds the constants with ``dtype=torch.bfloat16`` at inference (``preprocess_image`` of its released
    HF code) and in the image's bf16 dtype in training. Measured: with these values an export's masks equal those
    of Sa2VA's own ``predict_forward`` pixel for pixel; with the exact values 0.1-0.6 % of the pixels differ, at
    mask borders. ``"exact"``: the float values, for models trained with float32 preprocessing."""
    import torch

    if mode not in SAM2_NORMALIZATIONS:
        raise MissingInput(f"--sam2-normalization must be one of {', '.join(SAM2_NORMALIZATIONS)}, got {mode!r}")
    if mode == "exact":
        return {"sam2_pixel_mean": list(_IMAGENET_MEAN), "sam2_pixel_std": list(_IMAGENET_STD)}
    rounded = lambda v: [float(x) for x in torch.tensor(v, dtype=torch.bfloat16).float()]  # noqa: E731
    return {"sam2_pixel_mean": rounded(_IMAGENET_MEAN), "sam2_pixel_std": rounded(_IMAGENET_STD)}


def copy_export_code(out: Path, family_dir: str, names: tuple[str, ...]) -> list[str]:
    """Copy a family's configuration/modeling files and the shared ``sa2va_common.py`` (which the modeling file
    imports relatively) into the export folder ``out``; returns the file names."""
    import shutil

    written = []
    for name in names:
        shutil.copy2(EXPORT_DIR / family_dir / name, out / name)
        written.append(name)
    shutil.copy2(EXPORT_DIR / "common" / "sa2va_common.py", out / "sa2va_common.py")
    return [*written, "sa2va_common.py"]


def target_shapes(model_cls, config) -> dict[str, tuple[int, ...]]:
    """The export model's tensor shapes, from an instance built on the ``meta`` device (no memory)."""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_export_files(out: Path, *, config, family_dir: str, code_files: tuple[str, ...], tokenizer, base_dir: Path,
                       template: dict, base_files: tuple[str, ...] = ()) -> list[str]:
    """Every non-weight file of an export folder: ``config.json``, the modeling code (+ ``sa2va_common.py``), the
    tokenizer, ``generation_config.json`` (stop words of ``template``) and ``base_files`` copied from the base folder
    when it has them. Returns the file names."""
    import shutil

    config.save_pretrained(out)
    written = ["config.json", *copy_export_code(out, family_dir, code_files)]
    tokenizer.save_pretrained(out)
    written += tokenizer_files(out)
    for f in base_files:
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, out / f)
            written.append(f)
    write_generation_config(base_dir, out, tokenizer, template)
    written.append("generation_config.json")
    return sorted(set(written))


def open_sam2(options: ConvertOptions, notes: list[str]):
    """Meta's SAM2 checkpoint (``--sam2``) as a source, its preset name and transformers' ``Sam2Config``; the
    architecture comes from ``--sam2-config``, a ``.config.json`` beside the checkpoint, or the tensor shapes."""
    if options.sam2 is None:
        raise MissingInput("--sam2 is required: Meta's SAM2 checkpoint the run started from (e.g. sam2_hiera_large.pt)")
    sam2 = open_sam2_checkpoint(options.sam2, allow_unsafe_pickle=options.allow_unsafe_pickle)
    sam2_cfg_path = options.sam2_config
    sidecar = Path(options.sam2).with_suffix(".config.json")
    if sam2_cfg_path is None and sidecar.is_file():
        sam2_cfg_path = sidecar
        notes.append(f"SAM2 architecture read from {sidecar.name} beside the checkpoint")
    if sam2_cfg_path is not None:
        preset, spec = "custom", sam2map.spec_from_meta_config(read_json(Path(sam2_cfg_path)))
    else:
        preset, spec = sam2map.detect_sam2_preset(sam2)
    return sam2, preset, sam2map.hf_sam2_config(spec)


def lora_settings(ckpt: TrainingCheckpoint, cfg: TrainingConfig, options: ConvertOptions):
    """(r, alpha, use_rslora, scaling): r from the ``lora_A`` tensors (one rank for all), alpha from flags, else
    the training config; checked against each other. All None when the checkpoint has no LoRA."""
    keys = ckpt.source.keys()
    a_keys = [k for k in keys if k.endswith(".lora_A.default.weight")]
    ranks = {ckpt.source.info(k).shape[0] for k in a_keys}
    if len(ranks) > 1:
        raise ShapeMismatch(f"LoRA ranks differ between layers ({sorted(ranks)}); per-layer ranks are not supported")
    r = ranks.pop() if ranks else None
    if r is not None and options.lora_r is not None and options.lora_r != r:
        raise ShapeMismatch(f"--lora-r {options.lora_r} but the checkpoint's lora_A tensors have rank {r}")
    if r is not None and cfg.lora_r is not None and cfg.lora_r != r:
        raise ShapeMismatch(f"the training config says r={cfg.lora_r} but the lora_A tensors have rank {r}")
    alpha = options.lora_alpha if options.lora_alpha is not None else cfg.lora_alpha
    rslora = options.use_rslora if options.use_rslora is not None else cfg.use_rslora
    if r is not None and alpha is None:
        raise MissingInput("LoRA alpha is unknown: the checkpoint has no training config with lora_alpha; "
                           "pass --lora-alpha (Sa2VA configs use 2*r, e.g. 256 for r=128)")
    scaling = lora_scaling(alpha, r, rslora) if r is not None else None
    return r, alpha, rslora, scaling


def plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Opaque):
        return str(obj)
    return obj


def tokenizer_files(out: Path) -> list[str]:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "merges.txt", "chat_template.jinja")
    return [n for n in names if (out / n).is_file()]


class quiet_transformers:
    """Silence transformers' logger inside the block (e.g. its "model of type internvl_chat" notice when a
    tokenizer is read from a remote-code model folder, which says nothing about the conversion)."""

    def __enter__(self):
        from transformers.utils import logging as tlogging

        self._level = tlogging.get_verbosity()
        tlogging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as tlogging

        tlogging.set_verbosity(self._level)
        return False


def write_generation_config(base_dir: Path, out: Path, tokenizer, template: dict) -> None:
    from transformers import GenerationConfig

    if (base_dir / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base_dir)
    else:
        gen = GenerationConfig()
    stop_ids = [tokenizer.convert_tokens_to_ids(w) for w in template.get("stop_words", [])]
    stop_ids = [i for i in stop_ids if isinstance(i, int) and i != tokenizer.unk_token_id]
    if stop_ids:
        gen.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample = False
    for k in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if hasattr(gen, k):
            setattr(gen, k, None)
    gen.save_pretrained(out)


