"""Family ``flmm``: F-LMM (the LMM frozen; a U-Net on its attention maps and SAM's prompt encoder + mask decoder
trained).

Sources:
- ``ckpt``: the training checkpoint, trainable parts only (a DeepSpeed ZeRO-2 folder, or the single ``.pth`` F-LMM's
  ``deepspeed2torch_state_dict.py`` writes): ``mask_head.*``, ``text_layer_weights``, ``text_proj.*``,
  ``sam.model.prompt_encoder.*``, ``sam.model.mask_decoder.*`` (and, from a module state, SAM buffers);
- ``base``: the frozen base LMM folder (``llava-hf/llava-1.5-7b-hf`` layout, or a Qwen2.5-VL folder), keys
  normalised to transformers' native layout (``model.language_model.*``, ``model.vision_tower.*`` /
  ``model.visual.*``, ``model.multi_modal_projector.*``, ``lm_head.*``);
- ``sam``: Meta's SAM checkpoint (``sam_vit_l_0b3195.pth``): the image encoder F-LMM does not save.

Target: ``FLMMModel`` (``remote/modeling_flmm.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

from ...convert.sources import RenamedSource, TensorSource, TrainingCheckpoint, open_hf_folder
from ...convert.training_config import TrainingConfig
from ...errors import MissingInput, ShapeMismatch, UnreadableFile, WrongFamily
from ...heads.sam import hf_sam_config, open_sam_checkpoint, sam_spec_of
from .. import Family
from .._common import plain, quiet_transformers, read_json, target_shapes, write_export_files
from ..spec import ConvertOptions, Prepared
from .mapping import rules
from .spec import SPEC

NAME = SPEC.name
BASES = ("llava", "qwen2_5_vl")  # base LMMs whose mapping is written (model_type of the base folder)
_ENC = re.compile(r"^mask_head\.encoder\.(\d+)\.(\d+)\.convs\.(\d+)\.conv\.weight$")
_DEC = re.compile(r"^mask_head\.decoder\.(\d+)\.conv_block\.convs\.(\d+)\.conv\.weight$")


def looks_like_flmm(ckpt: TrainingCheckpoint) -> bool:
    keys = ckpt.source.keys()
    return ("text_layer_weights" in keys and "mask_head.conv_seg.weight" in keys
            and any(k.startswith("sam.model.mask_decoder.") for k in keys))


def _normalise_llava_keys(src: TensorSource) -> TensorSource:
    """llava-hf folders saved before transformers 4.52 use ``language_model.model.*``, ``language_model.lm_head``,
    ``vision_tower.*``, ``multi_modal_projector.*``; present transformers' native names."""
    keys = src.keys()
    if any(k.startswith("model.language_model.") for k in keys):
        return src
    rename = {}
    for k in keys:
        if k.startswith("language_model.lm_head."):
            rename[k] = k[len("language_model."):]
        elif k.startswith("language_model.model."):
            rename[k] = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith(("vision_tower.", "multi_modal_projector.")):
            rename[k] = "model." + k
        else:
            rename[k] = k
    return RenamedSource(src, rename, src.description + " (legacy llava layout, keys normalised)")


def _normalise_qwen_keys(src: TensorSource) -> TensorSource:
    """Qwen2.5-VL folders saved in the legacy layout (``model.layers.*``, ``visual.*``): present transformers'
    native names (``model.language_model.*``, ``model.visual.*``)."""
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
    return RenamedSource(src, rename, src.description + " (legacy Qwen2.5-VL layout, keys normalised)")


NORMALISE = {"llava": _normalise_llava_keys, "qwen2_5_vl": _normalise_qwen_keys}


def mask_head_settings(ckpt: TrainingCheckpoint) -> dict:
    """The U-Net's sizes, read from the checkpoint's shapes: input channels and base width (first conv), number of
    stages and convs per encoder / decoder stage. GroupNorm's group count leaves no trace in the shapes: F-LMM's
    configs all use 1."""
    src = ckpt.source
    enc: dict[int, set[int]] = {}
    dec: dict[int, set[int]] = {}
    for k in src.keys():
        if m := _ENC.match(k):
            enc.setdefault(int(m.group(1)), set()).add(int(m.group(3)))
        elif m := _DEC.match(k):
            dec.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = len(enc)
    if not stages or sorted(enc) != list(range(stages)) or sorted(dec) != list(range(stages - 1)):
        raise UnreadableFile(f"{src.path}: the mask head's encoder stages {sorted(enc)} / decoder stages {sorted(dec)} "
                             "are not a UNet's (damaged checkpoint?)")
    for d in (*enc.values(), *dec.values()):
        if sorted(d) != list(range(len(d))):
            raise UnreadableFile(f"{src.path}: the mask head has non-contiguous conv indices {sorted(d)}")
    first = src.info("mask_head.encoder.0.0.convs.0.conv.weight").shape
    return {"in_channels": int(first[1]), "base_channels": int(first[0]), "num_stages": stages,
            "enc_num_convs": [len(enc[i]) for i in range(stages)],
            "dec_num_convs": [len(dec[i]) for i in range(stages - 1)], "norm_groups": 1}


def open_flmm_sam(options: ConvertOptions, notes: list[str]):
    """Meta's SAM (``--sam``) as the source ``sam``, its preset name (``custom`` for a non-official one, described
    from its shapes) and the ``SamConfig``."""
    if options.sam is None:
        raise MissingInput("--sam is required: Meta's SAM checkpoint F-LMM started from (sam_vit_l_0b3195.pth)")
    sam = open_sam_checkpoint(options.sam, allow_unsafe_pickle=options.allow_unsafe_pickle)
    preset, spec = sam_spec_of(sam)
    if preset == "custom":
        notes.append(f"SAM in {Path(options.sam).name} is none of the official presets: its sizes were read from the "
                     "tensor shapes (mask decoder heads: Meta's 8)")
    else:
        notes.append(f"SAM {preset} recognised from the tensor shapes of {Path(options.sam).name}")
        if preset != "vit_l":
            notes.append(f"F-LMM's released configs use SAM vit_l; this is {preset}")
    return sam, preset, hf_sam_config(spec)


class FLMM(Family):
    spec = SPEC

    def claims(self, ckpt: TrainingCheckpoint) -> bool:
        return looks_like_flmm(ckpt)

    def prepare(self, ckpt: TrainingCheckpoint, cfg: TrainingConfig, options: ConvertOptions) -> Prepared:
        from transformers import AutoConfig, AutoTokenizer

        from .remote.configuration_flmm import IMAGE_PROCESSORS, TEMPLATES, FLMMConfig
        from .remote.modeling_flmm import FLMMModel

        notes: list[str] = []
        # 1. the frozen base LMM
        if options.base is None:
            raise MissingInput("--base is required: the frozen base LMM folder F-LMM grounded (e.g. "
                               "llava-hf/llava-1.5-7b-hf)" + (f"; the training config names {cfg.base_path!r}"
                                                             if cfg.base_path else ""))
        base_dir = Path(options.base)
        if not base_dir.is_dir():
            raise MissingInput(f"base model folder {base_dir} does not exist")
        base_type = read_json(base_dir / "config.json").get("model_type")
        if base_type not in BASES:
            raise WrongFamily(f"base folder {base_dir} holds a {base_type!r} model; family {NAME} has a mapping for "
                              f"{', '.join(BASES)} bases (LLaVA-1.5 in the llava-hf layout, Qwen2.5-VL) only so far")
        try:
            lmm_config = AutoConfig.from_pretrained(base_dir)
        except Exception as exc:  # noqa: BLE001 - re-raised typed
            raise UnreadableFile(f"{base_dir}/config.json: not a readable {base_type} configuration ({exc})") from exc
        base = NORMALISE[base_type](open_hf_folder(base_dir, allow_unsafe_pickle=options.allow_unsafe_pickle))
        text = lmm_config.get_text_config()

        # 2. SAM
        sam, preset, sam_config = open_flmm_sam(options, notes)

        # 3. sizes the checkpoint implies, checked against the base before planning
        head = mask_head_settings(ckpt)
        channels = text.num_hidden_layers * text.num_attention_heads
        if head["in_channels"] != channels:
            raise ShapeMismatch(f"the mask head takes {head['in_channels']} attention maps but the base "
                                f"{base_dir.name} has {text.num_hidden_layers} layers x {text.num_attention_heads} "
                                f"heads = {channels}: wrong --base?")
        layer_weights = ckpt.source.info("text_layer_weights").shape
        if tuple(layer_weights) != (text.num_hidden_layers,):
            raise ShapeMismatch(f"text_layer_weights has shape {tuple(layer_weights)}, the base has "
                                f"{text.num_hidden_layers} layers: wrong --base?")
        if "text_proj.weight" not in ckpt.source.keys():
            raise UnreadableFile(f"{ckpt.source.path}: no text_proj.weight (an F-LMM checkpoint without SAM "
                                 "refinement is not supported)")
        proj = ckpt.source.info("text_proj.weight").shape
        if proj[1] != text.hidden_size or proj[0] != sam_config.prompt_encoder_config.hidden_size:
            raise ShapeMismatch(f"text_proj.weight is {tuple(proj)}; expected ({sam_config.prompt_encoder_config.hidden_size}"
                                f", {text.hidden_size}) for this base and SAM")

        # 4. tokenizer: the base's (the LMM is frozen: no tokens were added)
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(base_dir)
        except Exception as exc:  # noqa: BLE001 - re-raised typed
            raise UnreadableFile(f"{base_dir}: cannot load its tokenizer ({exc})") from exc
        template = TEMPLATES[base_type]
        placeholder = template["image_placeholder"]
        image_id = tokenizer.convert_tokens_to_ids(placeholder)
        if image_id != lmm_config.image_token_id:
            raise UnreadableFile(f"{base_dir}: the tokenizer gives {placeholder} id {image_id}, the config's image "
                                 f"token is {lmm_config.image_token_id}")

        # 5. image preprocessing: LLaVA: the vision tower's size and the base's normalisation; Qwen2.5-VL: the base
        #    processor's patch/merge sizes, normalisation and pixel bounds
        image_processor = dict(IMAGE_PROCESSORS[base_type])
        if base_type == "llava":
            image_processor["size"] = int(lmm_config.vision_config.image_size)
        pp = base_dir / "preprocessor_config.json"
        if pp.is_file():
            raw = read_json(pp)
            for k in ("image_mean", "image_std"):
                if isinstance(raw.get(k), list) and len(raw[k]) == 3:
                    image_processor[k] = [float(x) for x in raw[k]]
            if base_type == "qwen2_5_vl":
                for k in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
                    if isinstance(raw.get(k), int) and raw[k] > 0:
                        image_processor[k] = raw[k]
        from ... import __version__

        lmm_dict = lmm_config.to_dict()
        ties = "lm_head.weight" not in base
        if ties:
            notes.append(f"the base {base_dir.name} ties lm_head to the embeddings (no lm_head.weight): the export holds "
                         "the embedding matrix under both names, untied")
            lmm_dict["tie_word_embeddings"] = False
            if isinstance(lmm_dict.get("text_config"), dict):
                lmm_dict["text_config"]["tie_word_embeddings"] = False
        config = FLMMConfig(
            lmm_config=lmm_dict, sam_config=sam_config.to_dict(), mask_head=head,
            text_proj_dim=int(proj[0]), template=plain(template), image_processor=image_processor,
            maskport={"version": __version__, "family": NAME, "mapping_version": SPEC.mapping_version,
                      "sam_preset": preset, "base_model_type": base_type},
        )
        config.architectures = [SPEC.model_class]
        config.auto_map = dict(SPEC.auto_map)
        expected = target_shapes(FLMMModel, config)

        def write_files(out: Path) -> list[str]:
            return write_export_files(out, spec=SPEC, config=config, tokenizer=tokenizer, base_dir=base_dir,
                                      template=config.template)

        notes.append("mask head GroupNorm groups: 1 (F-LMM's configs; not recorded in the checkpoint's shapes)")
        settings = {"base_model_type": base_type, "sam_preset": preset, "mask_head": head,
                    "training_config_base_path": cfg.base_path}
        return Prepared(sources={"ckpt": ckpt.source, "base": base, "sam": sam}, rules=rules(base_ties_lm_head=ties),
                        expected=expected,
                        export_config=config.to_dict(), write_files=write_files, notes=notes, settings=settings)
