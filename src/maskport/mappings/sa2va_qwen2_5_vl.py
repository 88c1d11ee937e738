"""Family ``sa2va-qwen2_5-vl``: Sa2VA fine-tuned on a Qwen2.5-VL base with SAM2.

Sources:
- ``ckpt``: the training checkpoint (trainable subset only): LoRA of the LLM under the peft prefix, the
  ``modules_to_save`` copies of ``embed_tokens``/``lm_head``, SAM2's mask decoder, ``text_hidden_fcs``;
- ``base``: the base MLLM folder (e.g. Qwen/Qwen2.5-VL-3B-Instruct), keys normalised to transformers'
  native layout (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``);
- ``sam2``: Meta's SAM2 checkpoint (``sam2_hiera_large.pt``).

Target: ``Sa2VAQwenModel`` (``maskport/export/sa2va_qwen2_5_vl``): ``mllm.*`` (transformers'
``Qwen2_5_VLForConditionalGeneration``), ``sam2.*`` (transformers' ``Sam2Model``), ``text_hidden_fcs.*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ..convert.rules import CopyRest, Drop, LoraMerge, Rename, Take
from ..convert.sources import RenamedSource, TensorSource, TrainingCheckpoint, open_hf_folder
from ..convert.training_config import TrainingConfig
from ..errors import MissingInput, ShapeMismatch, UnreadableFile, WrongFamily
from . import sam2_meta_to_hf as sam2map
from ._shared import lora_settings, open_sam2, sam2_normalization, target_shapes, write_export_files
from ._shared import plain as _plain
from ._shared import read_json as _read_json
from .registry import ConvertOptions, Prepared, register

NAME = "sa2va-qwen2_5-vl"
MAPPING_VERSION = "1"

PEFT = "ckpt:mllm.model.base_model.model."     # peft wraps Qwen2_5_VLForConditionalGeneration
LINEAR = "model.language_model.layers.{i}.{block}.{proj}"  # every LoRA-trained linear of the LLM
DEFAULT_SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
EXPORT_FILES = ("configuration_sa2va_qwen.py", "modeling_sa2va_qwen.py")


def rules(*, base_has_lm_head: bool = True) -> list:
    """The mapping table, top to bottom. Targets are keys of ``Sa2VAQwenModel``.

    ``base_has_lm_head``: False for a base that ties ``lm_head`` to ``embed_tokens`` and so saves no
    ``lm_head.weight`` (Qwen2.5-VL-3B): the trained ``modules_to_save`` copy then supersedes nothing in the base,
    and the export gets its own, untied ``lm_head``."""
    base_lm_head = ("base:lm_head.weight",) if base_has_lm_head else ()
    return [
        # 1. LoRA-trained linears of the LLM: base weight + (alpha / r) * B @ A, in float32
        LoraMerge(target="mllm." + LINEAR + ".weight",
                  base="base:" + LINEAR + ".weight",
                  a=PEFT + LINEAR + ".lora_A.default.weight",
                  b=PEFT + LINEAR + ".lora_B.default.weight"),
        # 2. modules_to_save: the trained copies replace the base tensors (and set the vocabulary size)
        Take(target="mllm.model.language_model.embed_tokens.weight",
             source=PEFT + "model.language_model.embed_tokens.modules_to_save.default.weight",
             replaces=("base:model.language_model.embed_tokens.weight",), optional=True),
        Take(target="mllm.lm_head.weight",
             source=PEFT + "lm_head.modules_to_save.default.weight",
             replaces=base_lm_head, optional=True),
        #    older (v1) checkpoints keep full trained copies directly under the peft prefix
        Take(target="mllm.model.language_model.embed_tokens.weight",
             source=PEFT + "model.language_model.embed_tokens.weight",
             replaces=("base:model.language_model.embed_tokens.weight",),
             why="trained full copy (v1 checkpoint) replaces the base tensor", optional=True),
        Take(target="mllm.lm_head.weight", source=PEFT + "lm_head.weight", replaces=base_lm_head,
             why="trained full copy (v1 checkpoint) replaces the base tensor", optional=True),
        #    frozen copies that some savers (DeepSpeed's module states) keep beside modules_to_save
        Drop(PEFT + "{rest}.original_module.weight",
             reason="frozen pre-training copy kept by peft modules_to_save; superseded by the trained copy",
             optional=True),
        # 3. the [SEG] projection into SAM2's prompt space: Linear(C, C) -> ReLU -> Linear(C, 256) -> Dropout
        Rename(target="text_hidden_fcs.{rest}", source="ckpt:text_hidden_fcs.{rest}"),
        # 4. SAM2: Meta's keys -> transformers' Sam2Model; the mask decoder from the training checkpoint
        *sam2map.sam2_rules(target_prefix="sam2.", mask_decoder_from="ckpt:grounding_encoder.sam2_model."),
        # 5. everything else of the base MLLM (vision tower, merger, norms, untouched linears), unchanged
        CopyRest(target="mllm.{rest}", source="base:{rest}"),
    ]


# Chat templates Sa2VA trains with (xtuner's PROMPT_TEMPLATE names), as plain data.
TEMPLATES: dict[str, dict[str, Any]] = {
    "qwen_chat": {
        "system": "<|im_start|>system\n{system}<|im_end|>\n",
        "default_system": "You are a helpful assistant.",
        "user": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "suffix": "<|im_end|>",
        "stop_words": ["<|im_end|>", "<|endoftext|>"],
    },
}


@dataclass
class Ctx:
    lora_scaling: float | None


def _normalise_base_keys(src: TensorSource) -> TensorSource:
    """Saved Qwen2.5-VL folders use the legacy layout (``model.layers.*``, ``visual.*``); transformers'
    native module tree is ``model.language_model.*`` / ``model.visual.*``. Present the native names."""
    keys = src.keys()
    if any(k.startswith(("model.language_model.", "model.visual.")) for k in keys):
        return src
    rename = {}
    for k in keys:
        if k.startswith("visual."):
            rename[k] = "model." + k
        elif k.startswith("model."):
            rename[k] = "model.language_model." + k[len("model."):]
        else:
            rename[k] = k
    return RenamedSource(src, rename, src.description + " (legacy layout, keys normalised)")


class Sa2VAQwen25VL:
    name = NAME
    mapping_version = MAPPING_VERSION
    description = "Sa2VA on Qwen2.5-VL (LoRA + modules_to_save + SAM2 mask decoder + text_hidden_fcs)"

    def claims(self, ckpt: TrainingCheckpoint) -> bool:
        keys = ckpt.source.keys()
        return any(k.startswith("mllm.model.base_model.model.model.language_model.") for k in keys) and any(
            k.startswith("text_hidden_fcs.") for k in keys)

    def prepare(self, ckpt: TrainingCheckpoint, cfg: TrainingConfig, options: ConvertOptions) -> Prepared:
        from transformers import AutoTokenizer, Qwen2_5_VLConfig

        from ..export.sa2va_qwen2_5_vl.configuration_sa2va_qwen import Sa2VAQwenConfig
        from ..export.sa2va_qwen2_5_vl.modeling_sa2va_qwen import Sa2VAQwenModel

        notes: list[str] = []
        if options.pretrained_pth is not None:
            raise MissingInput(f"--pretrained-pth is not supported by family {NAME} yet (InternVL family only)")
        # 1. the base MLLM folder
        if options.base is None:
            raise MissingInput("--base is required: the base MLLM folder the run fine-tuned "
                               f"(the training config names {cfg.base_path!r})" if cfg.base_path else
                               "--base is required: the base MLLM folder (e.g. Qwen2.5-VL-3B-Instruct)")
        base_dir = Path(options.base)
        if not base_dir.is_dir():
            raise MissingInput(f"base model folder {base_dir} does not exist")
        base_cfg = _read_json(base_dir / "config.json")
        if base_cfg.get("model_type") != "qwen2_5_vl":
            raise WrongFamily(f"base folder {base_dir} holds a {base_cfg.get('model_type')!r} model; family {NAME} "
                              "needs a Qwen2.5-VL base (e.g. Qwen/Qwen2.5-VL-3B-Instruct)")
        base = _normalise_base_keys(open_hf_folder(base_dir, allow_unsafe_pickle=options.allow_unsafe_pickle))
        mllm_config = Qwen2_5_VLConfig.from_pretrained(base_dir)

        # 2. SAM2
        sam2, preset, sam2_config = open_sam2(options, notes)

        # 3. sizes the checkpoint implies, checked against the base before planning
        keys = set(ckpt.source.keys())
        hidden = mllm_config.text_config.hidden_size
        if "text_hidden_fcs.0.weight" in keys:
            c_in = ckpt.source.info("text_hidden_fcs.0.weight").shape[1]
            if c_in != hidden:
                raise ShapeMismatch(f"the checkpoint was trained on an LLM of hidden size {c_in} "
                                    f"(text_hidden_fcs.0.weight), but the base {base_dir.name} has {hidden}: wrong --base?")
        out_dim_key = "text_hidden_fcs.2.weight"
        out_dim = ckpt.source.info(out_dim_key).shape[0] if out_dim_key in keys else 256

        embed_keys = [k for k in keys if k.endswith("embed_tokens.modules_to_save.default.weight")
                      or k == PEFT.split(":", 1)[1] + "model.language_model.embed_tokens.weight"]
        vocab = ckpt.source.info(embed_keys[0]).shape[0] if embed_keys else mllm_config.text_config.vocab_size

        # 4. LoRA scaling: r from the tensors, alpha from flags > training config
        r, alpha, rslora, scaling = lora_settings(ckpt, cfg, options)

        # 5. tokenizer: the base's, plus the special tokens the run added (same order => same ids)
        special = options.special_tokens or cfg.special_tokens or DEFAULT_SPECIAL_TOKENS
        try:
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
        except Exception as exc:  # noqa: BLE001 - re-raised typed
            raise UnreadableFile(f"{base_dir}: cannot load its tokenizer ({exc})") from exc
        tokenizer.add_tokens(special, special_tokens=True)
        seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
        if "[SEG]" not in special:
            raise MissingInput(f"the special tokens {special} do not include [SEG]")
        if seg_id >= vocab:
            raise ShapeMismatch(f"[SEG] gets id {seg_id} but the trained embeddings have only {vocab} rows: "
                                "the base tokenizer does not match the one used in training")
        if len(tokenizer) != vocab:
            notes.append(f"tokenizer has {len(tokenizer)} tokens, embeddings {vocab} rows (padded vocabulary)")

        # 6. the export config
        mllm_dict = mllm_config.to_dict()
        mllm_dict["text_config"]["vocab_size"] = vocab
        mllm_dict["text_config"]["tie_word_embeddings"] = False
        mllm_dict["tie_word_embeddings"] = False
        template = cfg.template
        if isinstance(template, str):
            if template not in TEMPLATES:
                raise UnreadableFile(f"unknown chat template {template!r} in the training config; known: {sorted(TEMPLATES)}")
            template = TEMPLATES[template]
        elif not isinstance(template, dict):
            template = TEMPLATES["qwen_chat"]
            notes.append("no chat template in the training config: using qwen_chat")
        image_processor = _image_processor_settings(base_dir, cfg)
        from .. import __version__

        config = Sa2VAQwenConfig(
            mllm_config=mllm_dict,
            sam2_config=sam2_config.to_dict(),
            seg_token="[SEG]",
            seg_token_id=seg_id,
            special_tokens=list(special),
            template=_plain(template),
            image_processor=image_processor,
            text_hidden_fcs_out_dim=out_dim,
            **sam2_normalization(options.sam2_normalization),
            maskport={"version": __version__, "family": NAME, "mapping_version": MAPPING_VERSION,
                      "sam2_preset": preset},
        )
        config.architectures = ["Sa2VAQwenModel"]
        config.auto_map = {"AutoConfig": "configuration_sa2va_qwen.Sa2VAQwenConfig",
                           "AutoModel": "modeling_sa2va_qwen.Sa2VAQwenModel"}
        expected = target_shapes(Sa2VAQwenModel, config)

        def write_files(out: Path) -> list[str]:
            return write_export_files(out, config=config, family_dir="sa2va_qwen2_5_vl", code_files=EXPORT_FILES,
                                      tokenizer=tokenizer, base_dir=base_dir, template=template,
                                      base_files=("preprocessor_config.json", "chat_template.json",
                                                  "chat_template.jinja", "video_preprocessor_config.json"))

        settings = {
            "lora": {"r": r, "alpha": alpha, "use_rslora": rslora, "scaling": scaling,
                     "source": "flags" if options.lora_alpha is not None else cfg.found_in.get("lora")},
            "special_tokens": special, "seg_token_id": seg_id, "vocab_size": vocab,
            "sam2_preset": preset, "template": template, "base_model_type": "qwen2_5_vl",
            "training_config_base_path": cfg.base_path,
        }
        base_has_lm_head = "lm_head.weight" in base
        if not base_has_lm_head:
            notes.append(f"the base {base_dir.name} ties lm_head to embed_tokens (no lm_head.weight); the export "
                         "gets the trained lm_head untied")
        return Prepared(sources={"ckpt": ckpt.source, "base": base, "sam2": sam2},
                        rules=rules(base_has_lm_head=base_has_lm_head),
                        ctx=Ctx(scaling), expected=expected, export_config=config.to_dict(),
                        write_files=write_files, notes=notes, settings=settings)


def _image_processor_settings(base_dir: Path, cfg: TrainingConfig) -> dict:
    """Qwen2-VL image-processor settings for the export.

    Patch/merge sizes and normalisation come from the base's ``preprocessor_config.json`` (they are part of
    the vision tower). The pixel bounds do not: Sa2VA's inference uses its own (512*28*28 .. 2048*28*28, the
    export config's defaults), so the base's bounds are not copied; a training config that sets
    ``min_pixels``/``max_pixels`` wins."""
    settings: dict[str, Any] = {}
    pp = base_dir / "preprocessor_config.json"
    if pp.is_file():
        raw = _read_json(pp)
        for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            if k in raw:
                settings[k] = raw[k]
    for key in ("min_pixels", "max_pixels"):
        for path, val in _iter_raw(cfg.raw):
            if path.split(".")[-1] == key and isinstance(val, int):
                settings[key] = val
                break
    return settings


def _iter_raw(obj: Any, path: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else str(k)
            yield p, v
            yield from _iter_raw(v, p)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _iter_raw(v, f"{path}[{i}]")


register(Sa2VAQwen25VL())
