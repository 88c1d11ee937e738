"""Loading the two models and calling ``predict_forward`` the same way on both.

A model is given as an export folder (loaded with ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` and
its own tokenizer) or, from Python, as :class:`InMemoryModel` (anything with Sa2VA's ``predict_forward``).
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MaskportError, MissingInput

DTYPES = ("auto", "bf16", "fp16", "fp32")


class ModelLoadError(MaskportError):
    """An export folder exists but the model or its tokenizer could not be loaded."""


class PredictionError(MaskportError):
    """``predict_forward`` raised, or returned something that is not Sa2VA's output."""


@dataclass
class InMemoryModel:
    """A model already in memory: ``model.predict_forward(image=, text=, tokenizer=, ...)`` as Sa2VA's.
    ``label`` names it in the report (instead of a folder path)."""

    model: Any
    tokenizer: Any = None
    label: str = "in-memory model"


@dataclass
class Prediction:
    answer: str
    masks: list[np.ndarray]                  # bool (H, W), one per mask the model returned
    probabilities: list[np.ndarray] | None   # float32 (H, W) per mask, None when not asked or not supported
    seconds: float
    over_budget: bool = False


@dataclass
class LoadedModel:
    role: str
    model: Any
    tokenizer: Any
    info: dict[str, Any]
    seg_token: str = "[SEG]"
    supports_probabilities: bool = True
    load_seconds: float = 0.0
    _owned: bool = field(default=True, repr=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe(source, role: str) -> dict[str, Any]:
    """What the report says about a model before it is loaded (path, sha256 of config.json); checks it exists."""
    if isinstance(source, InMemoryModel):
        return {"role": role, "path": None, "label": source.label, "config_sha256": None,
                "class": type(source.model).__name__}
    path = Path(source)
    if not path.is_dir():
        raise MissingInput(f"{role} export folder {path} does not exist")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise MissingInput(f"{role} folder {path} has no config.json: not a HuggingFace export folder")
    return {"role": role, "path": str(path.resolve()), "label": path.name, "config_sha256": _sha256(cfg),
            "class": None}


def _torch_dtype(dtype: str):
    import torch

    return {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def load(source, role: str, device: str = "cpu", dtype: str = "auto", progress: bool = True) -> LoadedModel:
    info = describe(source, role)
    if isinstance(source, InMemoryModel):
        model = source.model
        info.update(dtype=str(getattr(model, "dtype", None)), device=str(getattr(model, "device", None)))
        cfg = getattr(model, "config", None)
        return LoadedModel(role, model, source.tokenizer, info, seg_token=getattr(cfg, "seg_token", "[SEG]"),
                           supports_probabilities=_accepts(model.predict_forward, "return_probabilities"),
                           _owned=False)
    if dtype not in DTYPES:
        raise MissingInput(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    hf_logging = None
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        model = AutoModel.from_pretrained(source, trust_remote_code=True, dtype=_torch_dtype(dtype))
        if getattr(model, "hf_device_map", None) is None and not getattr(model, "is_quantized", False):
            model = model.to(device)  # quantized or dispatched models stay where their loader put them
        model = model.eval()
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    except MaskportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"could not load {role} from {source}: {type(exc).__name__}: {first}") from exc
    finally:
        if hf_logging is not None and not progress and bars_were_on:
            hf_logging.enable_progress_bar()
    if not hasattr(model, "predict_forward"):
        raise ModelLoadError(f"{role} ({source}) loads as {type(model).__name__}, which has no predict_forward: "
                             f"not a maskport/Sa2VA export")
    info.update(dtype=str(model.dtype).replace("torch.", ""), device=str(model.device), **{"class": type(model).__name__})
    return LoadedModel(role, model, tokenizer, info, seg_token=getattr(model.config, "seg_token", "[SEG]"),
                       supports_probabilities=_accepts(model.predict_forward, "return_probabilities"),
                       load_seconds=time.perf_counter() - t0)


def unload(lm: LoadedModel) -> None:
    """Free a model this module loaded (the two models are never held at once)."""
    if not lm._owned:
        return
    lm.model = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def resolve_generation_kwargs(kwargs: dict | None, tokenizer) -> dict:
    """``sequence_bias`` given with token strings as keys (JSON can hold nothing else), e.g.
    ``{"[SEG]": 30.0}``, is turned into ``{(token_id, ...): 30.0}`` with this model's tokenizer."""
    out = dict(kwargs or {})
    bias = out.get("sequence_bias")
    if isinstance(bias, dict) and any(isinstance(k, str) for k in bias):
        resolved = {}
        for key, value in bias.items():
            if isinstance(key, str):
                if tokenizer is None:
                    raise MissingInput(f"sequence_bias key {key!r} needs a tokenizer to become token ids")
                tid = tokenizer.convert_tokens_to_ids(key)
                if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
                    key = (tid,)
                else:
                    key = tuple(tokenizer.encode(key, add_special_tokens=False))
            resolved[tuple(key)] = float(value)
        out["sequence_bias"] = resolved
    return out


def jsonable(obj):
    """A JSON-safe copy of generation kwargs and settings (tuple keys become strings)."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(list(k) if isinstance(k, tuple) else k)): jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _as_hw(arr, what: str, role: str, sample_id: str, hw: tuple[int, int], dtype) -> np.ndarray:
    try:
        a = np.asarray(arr.detach().float().cpu().numpy() if hasattr(arr, "detach") else arr)
    except Exception as exc:
        raise PredictionError(f"{role} returned a {what} that is not an array for sample {sample_id}: {exc}") from exc
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.shape != hw:
        raise PredictionError(f"{role} returned a {what} of shape {list(np.shape(arr))} for sample {sample_id}, "
                              f"whose image is {hw[0]} x {hw[1]}")
    return a.astype(dtype)


def _call_kwargs(lm: LoadedModel, *, mask_threshold, max_new_tokens, generation_kwargs, probabilities,
                 time_budget) -> tuple[dict[str, Any], bool]:
    kwargs: dict[str, Any] = {"tokenizer": lm.tokenizer}
    if mask_threshold is not None:
        kwargs["mask_threshold"] = float(mask_threshold)
    want_probs = probabilities and lm.supports_probabilities
    if want_probs:
        kwargs["return_probabilities"] = True
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = int(max_new_tokens)
    gk = dict(generation_kwargs or {})
    if time_budget:
        gk.setdefault("max_time", float(time_budget))
    if gk:
        kwargs["generation_kwargs"] = gk
    return kwargs, want_probs


def _call(lm: LoadedModel, sample_id: str, **kwargs):
    try:
        return lm.model.predict_forward(**kwargs)
    except MaskportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PredictionError(f"{lm.role} predict_forward failed on sample {sample_id}: "
                              f"{type(exc).__name__}: {first}") from exc


def _prediction(lm: LoadedModel, out, image, sample_id: str, want_probs: bool, seconds: float,
                time_budget: float | None) -> Prediction:
    if not isinstance(out, dict) or "prediction" not in out:
        raise PredictionError(f"{lm.role} predict_forward returned {type(out).__name__} for sample {sample_id}, "
                              f"expected a dict with 'prediction' and 'prediction_masks'")
    hw = (image.height, image.width)
    masks = [_as_hw(m, "mask", lm.role, sample_id, hw, bool) for m in (out.get("prediction_masks") or [])]
    probs = None
    if want_probs and out.get("prediction_probabilities") is not None:
        probs = [_as_hw(p, "probability map", lm.role, sample_id, hw, np.float32)
                 for p in out["prediction_probabilities"]]
        if len(probs) != len(masks):
            raise PredictionError(f"{lm.role} returned {len(masks)} masks but {len(probs)} probability maps "
                                  f"for sample {sample_id}")
    return Prediction(str(out["prediction"]), masks, probs, seconds,
                      over_budget=bool(time_budget) and seconds > float(time_budget))


def predict(lm: LoadedModel, image, prompt: str, sample_id: str, *, mask_threshold: float | None = None,
            max_new_tokens: int | None = None, generation_kwargs: dict | None = None, probabilities: bool = True,
            time_budget: float | None = None) -> Prediction:
    """One ``predict_forward`` call, greedy unless ``generation_kwargs`` say otherwise. With ``time_budget``,
    generation is stopped after that many seconds (transformers' ``max_time``) and the sample is flagged."""
    kwargs, want_probs = _call_kwargs(lm, mask_threshold=mask_threshold, max_new_tokens=max_new_tokens,
                                      generation_kwargs=generation_kwargs, probabilities=probabilities,
                                      time_budget=time_budget)
    t0 = time.perf_counter()
    out = _call(lm, sample_id, image=image, text=prompt, **kwargs)
    return _prediction(lm, out, image, sample_id, want_probs, time.perf_counter() - t0, time_budget)


def supports_batches(lm: LoadedModel) -> bool:
    """Whether the model predicts lists of samples as one batch (maskport exports: ``predict_batch``)."""
    return callable(getattr(lm.model, "predict_batch", None))


def predict_many(lm: LoadedModel, images: list, prompts: list[str], sample_ids: list[str], **options) -> list[Prediction]:
    """Several samples as one batch (``predict_forward`` with lists) when the model supports it, else one by one.
    Each sample's ``seconds`` is the batch's time divided by its size; ``time_budget`` bounds the batch."""
    if len(images) == 1 or not supports_batches(lm):
        return [predict(lm, im, p, i, **options) for im, p, i in zip(images, prompts, sample_ids)]
    kwargs, want_probs = _call_kwargs(lm, **options)
    label = f"{sample_ids[0]}..{sample_ids[-1]} (batch of {len(sample_ids)})"
    t0 = time.perf_counter()
    outs = _call(lm, label, image=list(images), text=list(prompts), **kwargs)
    seconds = (time.perf_counter() - t0) / len(images)
    if not isinstance(outs, list) or len(outs) != len(images):
        raise PredictionError(f"{lm.role} predict_forward returned {type(outs).__name__} for the batch {label}, "
                              f"expected a list of {len(images)} results")
    return [_prediction(lm, o, im, i, want_probs, seconds, options.get("time_budget"))
            for o, im, i in zip(outs, images, sample_ids)]
