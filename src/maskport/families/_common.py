"""Helpers the families share: reading JSON, the inputs most families declare (``--base``, LoRA, special tokens),
LoRA settings, the export folder's non-weight files (code, tokenizer, generation config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..convert.rules import lora_scaling
from ..convert.sources import TrainingCheckpoint
from ..convert.training_config import Opaque, TrainingConfig
from ..errors import MissingInput, ShapeMismatch, UnreadableFile
from ..heads import remote_file
from .spec import ConvertOptions, FamilySpec, InputOption

FAMILIES_DIR = Path(__file__).resolve().parent

# inputs most families declare (a family lists the ones it reads in its FamilySpec.inputs)
BASE_INPUT = InputOption("base", "path", "Base MLLM folder the run fine-tuned (e.g. Qwen2.5-VL-3B-Instruct, InternVL2_5-4B).")
LORA_INPUTS = (
    InputOption("lora_alpha", "float", "LoRA alpha (default: from the checkpoint's training config)."),
    InputOption("lora_r", "int", "LoRA rank, checked against the tensors."),
    InputOption("special_tokens", "csv", "Comma-separated special tokens added in training (default: from the config)."),
)


# The class names a Sa2VA training config spells for each Qwen-VL generation (its mllm wrapper, its processor): the
# only thing that tells a Qwen2.5-VL run from a Qwen3-VL one, whose trainable tensors have the same names.
_QWEN_VL_WORDS = {"qwen3_vl": ("Qwen3VL", "qwen3vl", "Qwen3-VL"), "qwen2_5_vl": ("Qwen2_5_VL", "Qwen2.5-VL")}


def qwen_vl_generation(ckpt: TrainingCheckpoint) -> str | None:
    """The base ``model_type`` (``qwen2_5_vl`` / ``qwen3_vl``) a Qwen-VL Sa2VA checkpoint's training config names,
    or ``None`` when it has no config or names neither (or both)."""
    text = ckpt.config_text or ""
    found = [mt for mt, words in _QWEN_VL_WORDS.items() if any(w in text for w in words)]
    return found[0] if len(found) == 1 else None


def looks_like_qwen_vl_sa2va(ckpt: TrainingCheckpoint) -> bool:
    """Keys of a Sa2VA run on a transformers Qwen-VL model: peft-wrapped ``model.language_model`` + text_hidden_fcs."""
    keys = ckpt.source.keys()
    return any(k.startswith("mllm.model.base_model.model.model.language_model.") for k in keys) and any(
        k.startswith("text_hidden_fcs.") for k in keys)


def released_qwen_vl_generation(folder_config: dict) -> str | None:
    """The Qwen-VL generation (``qwen2_5_vl`` / ``qwen3_vl``) of a released Sa2VA Qwen folder's ``config.json``
    (Sa2VA's ``Sa2VAChatConfigQwen``: a ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` saved with ``model_type``
    ``sa2va_chat``), from its sub-configs' model types; ``None`` for anything else (an InternVL release has
    ``llm_config``)."""
    if not isinstance(folder_config, dict) or folder_config.get("model_type") != "sa2va_chat":
        return None
    if "llm_config" in folder_config or not isinstance(folder_config.get("vision_config"), dict):
        return None
    types = [str(folder_config["vision_config"].get("model_type", ""))]
    if isinstance(folder_config.get("text_config"), dict):
        types.append(str(folder_config["text_config"].get("model_type", "")))
    for generation in ("qwen3_vl", "qwen2_5_vl"):
        if any(t == generation or t.startswith(generation + "_") for t in types):
            return generation
    return None


RELEASED_SAM2_PREFIX = "grounding_encoder.sam2_model."


def open_released_qwen_vl(src_dir: Path, allow_unsafe_pickle: bool = False):
    """A released Sa2VA Qwen folder (``Sa2VAChatModelQwen``: ``model.*`` = the LoRA-merged
    ``Qwen*VLForConditionalGeneration``, ``grounding_encoder.sam2_model.*`` = the whole SAM2 in Meta's names with
    ``gamma`` renamed ``g_weight`` by Sa2VA's export script, ``text_hidden_fcs.*``) as two sources: ``base`` (the
    MLLM in transformers' native names, ``model.language_model.*`` / ``model.visual.*`` / ``lm_head.weight``, a
    legacy ``model.layers.*`` / ``visual.*`` layout normalised; plus ``text_hidden_fcs.*``) and ``sam2`` (Meta's
    names). Any other tensor stays in ``base`` under its own name, where the plan reports it."""
    from ..convert.sources import RenamedSource, open_hf_folder
    from ..errors import WrongFamily

    folder = open_hf_folder(src_dir, allow_unsafe_pickle=allow_unsafe_pickle)
    keys = folder.keys()
    sam_keys = [k for k in keys if k.startswith(RELEASED_SAM2_PREFIX)]
    mllm_keys = [k for k in keys if k.startswith("model.")]
    if not sam_keys or not mllm_keys or not any(k.startswith("text_hidden_fcs.") for k in keys):
        raise WrongFamily(f"{src_dir}: no model.* / grounding_encoder.sam2_model.* / text_hidden_fcs.* tensors: not a "
                          "released Sa2VA Qwen folder")
    native = any(k.startswith(("model.model.language_model.", "model.model.visual.")) for k in mllm_keys)
    rename = {}
    for k in keys:
        if k in sam_keys:
            continue
        new = k
        if k.startswith("model."):
            new = k[len("model."):]
            if not native:
                if new.startswith("visual."):
                    new = "model." + new
                elif new.startswith("model."):
                    new = "model.language_model." + new[len("model."):]
        rename[k] = new
    base = RenamedSource(folder, rename, f"{Path(src_dir).name} without SAM2 (model.* -> the MLLM's own names"
                         + ("" if native else ", legacy layout normalised") + ")")
    sam2 = RenamedSource(folder, {k: k[len(RELEASED_SAM2_PREFIX):].replace(".g_weight", ".gamma") for k in sam_keys},
                         f"SAM2 inside {Path(src_dir).name} (grounding_encoder.sam2_model.*, g_weight -> gamma)")
    return base, sam2


# peft's names of an adapted module's tensors -> the module's own names (what a training run that loads pretrained
# weights *before* wrapping its adapters reads): modules_to_save copies and LoRA'd layers become plain modules
PEFT_UNWRAP = ((".modules_to_save.default.", "."), (".lora_A.default.", "."), (".base_layer.", "."))
TRAINING_PTH_FROZEN = ("not trained (frozen): the training run builds it again from its base model and SAM2 "
                       "checkpoint")
TRAINING_PTH_NOTE = ("LoRA is merged into the layers' weights, saved under the un-wrapped module names: load it "
                     "as pretrained_pth (before LoRA is wrapped); continued training adds fresh LoRA on top")


def read_json(path: Path) -> dict:
    """A JSON object from an input folder (bounded, duplicate keys refused; :mod:`maskport.io.jsonfile`)."""
    from ..io.jsonfile import read_json_file

    return read_json_file(path)


def copy_export_code(out: Path, spec: FamilySpec) -> list[str]:
    """Copy a family's configuration/modeling files (``families/<package>/remote/``) and the shared heads it uses
    (``heads/remote/``, which the modeling file imports relatively) into the export folder ``out``; returns the
    file names."""
    import shutil

    written = []
    for name in spec.code_files:
        shutil.copy2(FAMILIES_DIR / spec.package / "remote" / name, out / name)
        written.append(name)
    for head in spec.heads:
        shutil.copy2(remote_file(head), out / f"{head}.py")
        written.append(f"{head}.py")
    return written


def target_shapes(model_cls, config) -> dict[str, tuple[int, ...]]:
    """The export model's tensor shapes, from an instance built on the ``meta`` device (no memory)."""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_export_files(out: Path, *, spec: FamilySpec, config, tokenizer, base_dir: Path, template: dict) -> list[str]:
    """Every non-weight file of an export folder: ``config.json`` (``architectures``/``auto_map`` from the spec),
    the modeling code and its shared heads, the tokenizer, ``generation_config.json`` (stop words of ``template``)
    and the spec's ``base_files`` copied from the base folder when it has them. Returns the file names."""
    import shutil

    config.architectures = [spec.model_class]
    config.auto_map = dict(spec.auto_map)
    config.save_pretrained(out)
    written = ["config.json", *copy_export_code(out, spec)]
    tokenizer.save_pretrained(out)
    for f in spec.base_files:
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, out / f)
            written.append(f)
    drop_foreign_auto_map(out)
    written += tokenizer_files(out)
    write_generation_config(base_dir, out, tokenizer, template)
    written.append("generation_config.json")
    return sorted(set(written))


def drop_foreign_auto_map(out: Path) -> list[str]:
    """Remove from the export's ``tokenizer_config.json`` the ``auto_map`` entries that name code the export does
    not hold (a base folder's remote tokenizer class, e.g. ``tokenization_internlm2.InternLM2Tokenizer``): with
    them, ``AutoTokenizer.from_pretrained(export, trust_remote_code=True)`` looks for a missing module. The export
    loads with the files it holds. Returns the entries removed."""
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return []
    from ..io.jsonfile import read_json_file

    data = read_json_file(path, what="the export's tokenizer config")
    amap = data.get("auto_map")
    if amap is None:
        return []

    def present(ref) -> bool:
        if ref is None:
            return True
        if not isinstance(ref, str) or "." not in ref:
            return False
        module = ref.split("--")[-1].rsplit(".", 1)[0]  # "repo--module.Class" names another repository's code
        return "--" not in ref and (out / f"{module}.py").is_file()

    removed = []
    if isinstance(amap, dict):
        for key, ref in list(amap.items()):
            refs = ref if isinstance(ref, (list, tuple)) else [ref]
            if not all(present(r) for r in refs):
                removed.append(key)
                del amap[key]
        if not amap:
            data.pop("auto_map")
    else:
        data.pop("auto_map")
        removed.append("auto_map")
    if removed:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return removed


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
    rslora = cfg.use_rslora
    if r is not None and alpha is None:
        raise MissingInput("LoRA alpha is unknown: the checkpoint has no training config with lora_alpha; "
                           "pass --lora-alpha (Sa2VA configs use 2*r, e.g. 256 for r=128)")
    try:
        scaling = lora_scaling(alpha, r, rslora) if r is not None else None
    except ValueError as exc:
        where = "--lora-alpha" if options.lora_alpha is not None else \
            f"the training config ({cfg.found_in.get('lora', 'lora settings')})"
        raise MissingInput(f"{where}: {exc}; pass a finite --lora-alpha") from None
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


