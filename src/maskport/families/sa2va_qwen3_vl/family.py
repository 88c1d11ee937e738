"""Family ``sa2va-qwen3-vl``: Sa2VA fine-tuned on a Qwen3-VL base with SAM2.

Sources:
- ``ckpt``: the training checkpoint (trainable subset only): LoRA of the LLM under the peft prefix, the
  ``modules_to_save`` copies of ``embed_tokens``/``lm_head``, SAM2's mask decoder, ``text_hidden_fcs``;
- ``base``: the base MLLM folder (e.g. Qwen/Qwen3-VL-4B-Instruct), keys normalised to transformers'
  native layout (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``);
- ``sam2``: Meta's SAM2 checkpoint (``sam2_hiera_large.pt``).

Released folders (``sa2va-hf-to-native``): see :meth:`Sa2VAQwen3VL.prepare_released`.

Target: ``Sa2VAQwen3VLModel`` (``remote/``): ``mllm.*`` (transformers'
``Qwen3VLForConditionalGeneration``), ``sam2.*`` (transformers' ``Sam2Model``), ``text_hidden_fcs.*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from ...convert.sources import RenamedSource, TensorSource, TrainingCheckpoint, open_hf_folder
from ...convert.training_config import TrainingConfig
from ...errors import MissingInput, ShapeMismatch, UnreadableFile, WrongFamily
from ...heads.sam2 import open_sam2, sam2_architecture, sam2_normalization
from .. import Family
from .._common import (looks_like_qwen_vl_sa2va, lora_settings, open_released_qwen_vl, quiet_transformers,
                       qwen_vl_generation, released_qwen_vl_generation, target_shapes, write_export_files)
from .._common import plain as _plain
from .._common import read_json as _read_json
from ..spec import ConvertOptions, Prepared
from .mapping import PEFT, released_rules, rules
from .spec import SPEC

NAME = SPEC.name
DEFAULT_SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
GENERATION = "qwen3_vl"  # the base's model_type
# keys of a released folder's config.json that are Sa2VA's, not the MLLM configuration's
_RELEASED_CONFIG_EXTRAS = ("model_type", "architectures", "auto_map", "template", "transformers_version",
                           "_name_or_path")

# Chat templates Sa2VA trains with (xtuner's PROMPT_TEMPLATE names), as plain data.
TEMPLATES: dict[str, dict[str, Any]] = {
    # as rendered by Qwen3-VL's chat template, which Sa2VA's inference uses: no default system prompt
    "qwen_chat": {
        "system": "<|im_start|>system\n{system}<|im_end|>\n",
        "default_system": "",
        "user": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "suffix": "<|im_end|>",
        "stop_words": ["<|im_end|>", "<|endoftext|>"],
    },
}


def _normalise_base_keys(src: TensorSource) -> TensorSource:
    """Qwen3-VL folders are saved in transformers' native layout (``model.language_model.*``, ``model.visual.*``);
    a folder in the older flat layout (``model.layers.*``, ``visual.*``) is presented under the native names."""
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
    return RenamedSource(src, rename, src.description + " (flat layout, keys normalised)")


class Sa2VAQwen3VL(Family):
    spec = SPEC

    def claims(self, ckpt: TrainingCheckpoint) -> bool:
        """Sa2VA-on-Qwen-VL keys (the same names as a Qwen2.5-VL run) and a training config naming Qwen3-VL
        (``sa2va_qwen3_4b.py``: ``Qwen3VL`` wrapper, ``Qwen3VLProcessor``). Without a config, ``--family``."""
        return looks_like_qwen_vl_sa2va(ckpt) and qwen_vl_generation(ckpt) == "qwen3_vl"

    def accepts(self, ckpt: TrainingCheckpoint) -> bool:
        return looks_like_qwen_vl_sa2va(ckpt)

    def prepare(self, ckpt: TrainingCheckpoint, cfg: TrainingConfig, options: ConvertOptions) -> Prepared:
        from transformers import AutoTokenizer, Qwen3VLConfig

        from .remote.configuration_sa2va_qwen3_vl import Sa2VAQwen3VLConfig
        from .remote.modeling_sa2va_qwen3_vl import Sa2VAQwen3VLModel

        notes: list[str] = []
        # 1. the base MLLM folder
        if options.base is None:
            raise MissingInput("--base is required: the base MLLM folder the run fine-tuned "
                               f"(the training config names {cfg.base_path!r})" if cfg.base_path else
                               "--base is required: the base MLLM folder (e.g. Qwen3-VL-4B-Instruct)")
        base_dir = Path(options.base)
        if not base_dir.is_dir():
            raise MissingInput(f"base model folder {base_dir} does not exist")
        base_cfg = _read_json(base_dir / "config.json")
        if base_cfg.get("model_type") != "qwen3_vl":
            raise WrongFamily(f"base folder {base_dir} holds a {base_cfg.get('model_type')!r} model; family {NAME} "
                              "needs a Qwen3-VL base (e.g. Qwen/Qwen3-VL-4B-Instruct)")
        base = _normalise_base_keys(open_hf_folder(base_dir, allow_unsafe_pickle=options.allow_unsafe_pickle))
        mllm_config = Qwen3VLConfig.from_pretrained(base_dir)

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
        from ... import __version__

        config = Sa2VAQwen3VLConfig(
            mllm_config=mllm_dict,
            sam2_config=sam2_config.to_dict(),
            seg_token="[SEG]",
            seg_token_id=seg_id,
            special_tokens=list(special),
            template=_plain(template),
            image_processor=image_processor,
            text_hidden_fcs_out_dim=out_dim,
            **sam2_normalization(options.sam2_normalization),
            maskport={"version": __version__, "family": NAME, "mapping_version": SPEC.mapping_version,
                      "sam2_preset": preset},
        )
        config.architectures = [SPEC.model_class]
        config.auto_map = dict(SPEC.auto_map)
        expected = target_shapes(Sa2VAQwen3VLModel, config)

        def write_files(out: Path) -> list[str]:
            return write_export_files(out, spec=SPEC, config=config, tokenizer=tokenizer, base_dir=base_dir,
                                      template=template)

        settings = {
            "lora": {"r": r, "alpha": alpha, "use_rslora": rslora, "scaling": scaling,
                     "source": "flags" if options.lora_alpha is not None else cfg.found_in.get("lora")},
            "special_tokens": special, "seg_token_id": seg_id, "vocab_size": vocab,
            "sam2_preset": preset, "template": template, "base_model_type": "qwen3_vl",
            "training_config_base_path": cfg.base_path,
        }
        base_has_lm_head = "lm_head.weight" in base
        if not base_has_lm_head:
            notes.append(f"the base {base_dir.name} ties lm_head to embed_tokens (no lm_head.weight); the export "
                         "gets the trained lm_head untied")
        return Prepared(sources={"ckpt": ckpt.source, "base": base, "sam2": sam2},
                        rules=rules(base_has_lm_head=base_has_lm_head, lora_scaling=scaling), expected=expected, export_config=config.to_dict(),
                        write_files=write_files, notes=notes, settings=settings)


    def training_layout(self, export_config: dict):
        from .mapping import training_layout

        return training_layout()

    # ---- released Sa2VA HF folders (ByteDance's Sa2VA Qwen releases) ----------------------------------------
    def claims_released(self, folder_config: dict) -> bool:
        return released_qwen_vl_generation(folder_config) == GENERATION

    def prepare_released(self, src_dir: Path, options: ConvertOptions) -> Prepared:
        """A released Sa2VA folder (Sa2VA's ``tools/convert_to_hf.py``: ``Sa2VAChatModelQwen`` with ``model.*`` = the
        LoRA-merged MLLM, ``grounding_encoder.sam2_model.*`` = the whole SAM2 in Meta's names, ``gamma`` ->
        ``g_weight``, ``text_hidden_fcs.*``; ``config.json`` = the MLLM's config with ``model_type`` ``sa2va_chat``,
        ``template``, ``auto_map``) -> the same native export as a converted training checkpoint. The folder's
        remote code is never run: its config is read as JSON."""
        from transformers import AutoTokenizer, Qwen3VLConfig

        from .remote.configuration_sa2va_qwen3_vl import Sa2VAQwen3VLConfig
        from .remote.modeling_sa2va_qwen3_vl import Sa2VAQwen3VLModel

        notes: list[str] = []
        src_dir = Path(src_dir)
        src_cfg = _read_json(src_dir / "config.json")
        base, sam2 = open_released_qwen_vl(src_dir, options.allow_unsafe_pickle)
        preset, _, sam2_config = sam2_architecture(sam2, options)
        mllm_kwargs = {k: v for k, v in src_cfg.items() if k not in _RELEASED_CONFIG_EXTRAS}
        mllm_kwargs["architectures"] = ["Qwen3VLForConditionalGeneration"]  # what the MLLM's own folder says (Sa2VA's wrapper replaced it)
        try:
            mllm_config = Qwen3VLConfig(**mllm_kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised typed
            raise UnreadableFile(f"{src_dir}/config.json: not a {GENERATION} configuration ({exc})") from exc
        embed = "model.language_model.embed_tokens.weight"
        for key in (embed, "lm_head.weight", "text_hidden_fcs.0.weight", "text_hidden_fcs.2.weight"):
            if key not in base:
                raise UnreadableFile(f"{src_dir}: tensor {key!r} is missing (model.{key} for the MLLM)")
        vocab = base.info(embed).shape[0]
        hidden = mllm_config.text_config.hidden_size
        c_in = base.info("text_hidden_fcs.0.weight").shape[1]
        if c_in != hidden:
            raise ShapeMismatch(f"text_hidden_fcs.0.weight takes {c_in} features but the LLM's hidden size is {hidden}")
        out_dim = base.info("text_hidden_fcs.2.weight").shape[0]
        special = list(DEFAULT_SPECIAL_TOKENS)  # Sa2VA's, in its order (checked against the folder's tokenizer)
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - re-raised typed
            raise UnreadableFile(f"{src_dir}: cannot load its tokenizer ({exc})") from exc
        missing = [t for t in special if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise UnreadableFile(f"{src_dir}: the tokenizer lacks Sa2VA's tokens {missing}: not a released Sa2VA folder?")
        seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
        if seg_id >= vocab:
            raise ShapeMismatch(f"[SEG] has id {seg_id} but the embeddings have only {vocab} rows")
        template = src_cfg.get("template")
        if template in TEMPLATES:
            template = TEMPLATES[template]
        else:
            notes.append(f"the folder's template {template!r} is not one Sa2VA trains with; using qwen_chat")
            template = TEMPLATES["qwen_chat"]
        mllm_dict = mllm_config.to_dict()
        mllm_dict["text_config"]["vocab_size"] = vocab
        mllm_dict["text_config"]["tie_word_embeddings"] = False
        mllm_dict["tie_word_embeddings"] = False
        from ... import __version__

        config = Sa2VAQwen3VLConfig(
            mllm_config=mllm_dict, sam2_config=sam2_config.to_dict(), seg_token="[SEG]", seg_token_id=seg_id,
            special_tokens=special, template=_plain(template),
            image_processor=_image_processor_settings(src_dir, TrainingConfig.from_text(None)),
            text_hidden_fcs_out_dim=out_dim, **sam2_normalization(options.sam2_normalization),
            maskport={"version": __version__, "family": NAME, "mapping_version": SPEC.mapping_version,
                      "sam2_preset": preset, "released_folder": src_dir.name},
        )
        config.architectures = [SPEC.model_class]
        config.auto_map = dict(SPEC.auto_map)
        expected = target_shapes(Sa2VAQwen3VLModel, config)

        def write_files(out: Path) -> list[str]:
            return write_export_files(out, spec=SPEC, config=config, tokenizer=tokenizer, base_dir=src_dir,
                                      template=template)

        settings = {"special_tokens": special, "seg_token_id": seg_id, "vocab_size": vocab, "sam2_preset": preset,
                    "template": template, "base_model_type": GENERATION, "base_layout": "released Sa2VA folder"}
        return Prepared(sources={"base": base, "sam2": sam2}, rules=released_rules(), expected=expected,
                        export_config=config.to_dict(), write_files=write_files, notes=notes, settings=settings)


def _image_processor_settings(base_dir: Path, cfg: TrainingConfig) -> dict:
    """Qwen3-VL image-processor settings for the export.

    Patch/merge sizes and normalisation come from the base's ``preprocessor_config.json`` (they are part of
    the vision tower). The pixel bounds do not: Sa2VA's Qwen3-VL inference uses its own (512*28*28 .. 2048*28*28, the
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

