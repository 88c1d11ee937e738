"""Family ``lisa``: LISA training runs and released LISA folders.

Training runs (``maskport convert mmengine-to-hf``): a DeepSpeed ZeRO-2 folder (``global_stepN/
mp_rank_00_model_states.pt`` + ``latest``: the whole peft-wrapped ``LISAForCausalLM``, frozen parts included) or
what ``zero_to_fp32`` wrote (one ``pytorch_model.bin`` or shards + index, ``.bin`` or ``.safetensors``; the trainable
tensors, plus the frozen ones when DeepSpeed saved them). Keys ``base_model.model.*``: LoRA on the LLM's
``q_proj``/``v_proj``, ``embed_tokens`` and ``lm_head`` in full, SAM under ``model.visual_model.*``,
``model.text_hidden_fcs.0.*``. What the run did not save comes from ``--base`` (the LLaVA folder), ``--clip`` and
``--sam``.

Released folders (``maskport convert lisa-hf-to-native``): ``config.json`` with ``model_type`` ``llava`` and
``architectures`` ``["LISAForCausalLM"]``, ``.bin`` shards (read with the safe loader), keys ``model.*`` /
``lm_head.weight``, no CLIP (``--clip``).

Target: ``LisaModel`` (``remote/modeling_lisa.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...convert.rules import lora_scaling
from ...convert.sources import RenamedSource, TensorSource, TrainingCheckpoint, open_hf_folder
from ...convert.training_config import TrainingConfig
from ...errors import MissingInput, ShapeMismatch, UnreadableFile, UnsupportedCheckpoint, WrongFamily
from ...heads.sam import hf_sam_config, open_sam_checkpoint, sam_spec_of
from ...io.safetensors import TensorInfo
from .. import Family
from .._common import quiet_transformers, target_shapes, write_export_files
from .._common import read_json as _read_json
from ..spec import ConvertOptions, Prepared
from .mapping import CKPT_CLIP, rules
from .spec import SPEC

NAME = SPEC.name
PEFT = "base_model.model."
SAM_PREFIX = "model.visual_model."
SEG = "[SEG]"
IM_START, IM_END = "<im_start>", "<im_end>"
DEFAULT_LORA_ALPHA = 16  # LISA's train_ds.py default (--lora_alpha 16, with --lora_r 8)
TEMPLATE = {"stop_words": ["</s>"]}
# Llama fields of a LLaVA v1 / LISA config.json (flat, LLaVA's own format), passed to LlamaConfig
_LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                 "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling", "hidden_act",
                 "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
                 "head_dim")


class IdentitySource(TensorSource):
    """The second linear of transformers' LLaVA projector, made the identity: ``linear_2.weight`` = I (C x C),
    ``linear_2.bias`` = 0 (float32; exact in every dtype). LISA's projector is one linear."""

    def __init__(self, hidden: int):
        super().__init__("identity", Path("."), f"identity {hidden}x{hidden} + zero bias (LISA's one-linear projector)")
        self.hidden = int(hidden)

    def keys(self) -> list[str]:
        return ["linear_2.weight", "linear_2.bias"]

    def info(self, key: str) -> TensorInfo:
        shape = (self.hidden, self.hidden) if key == "linear_2.weight" else (self.hidden,)
        return TensorInfo(shape, torch.float32)

    def load(self, key: str) -> torch.Tensor:
        if key == "linear_2.weight":
            return torch.eye(self.hidden, dtype=torch.float32)
        return torch.zeros(self.hidden, dtype=torch.float32)


def split_views(source: TensorSource, prefix: str, main: str, sam: str) -> tuple[RenamedSource, RenamedSource]:
    """The model's tensors (``prefix`` removed, peft >= 0.7's ``.base_layer.`` folded) as two views that partition
    ``source``: ``main`` (LISA's names without ``model.visual_model.*``) and ``sam`` (that SAM, in Meta's names)."""
    rest, sam_map = {}, {}
    for k in source.keys():
        if not k.startswith(prefix):
            raise WrongFamily(f"{source.path}: tensor {k!r} is not under {prefix!r}; not a LISA layout")
        name = k[len(prefix):].replace(".base_layer.", ".")
        if name.startswith(SAM_PREFIX):
            sam_map[k] = name[len(SAM_PREFIX):]
        else:
            rest[k] = name
    try:
        return (RenamedSource(source, rest, f"{source.description} (LISA's names, without SAM)"),
                RenamedSource(source, sam_map, f"SAM inside {source.description} ({prefix}{SAM_PREFIX}*)"))
    except ValueError:
        raise UnreadableFile(f"{source.path}: holds both 'x.weight' and 'x.base_layer.weight' for one layer") from None


def _llama_config(flat: dict, vocab: int, where: Path):
    from transformers import LlamaConfig

    if isinstance(flat.get("text_config"), dict):
        raise UnsupportedCheckpoint(f"{where}/config.json is transformers' native LLaVA (text_config); family {NAME} "
                                    "takes LLaVA v1's own format (flat Llama fields, mm_vision_tower), as LISA uses")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if not isinstance(flat.get(k), int)]
    if missing:
        raise UnreadableFile(f"{where}/config.json: not a Llama-based LLaVA configuration (no {missing[0]})")
    kwargs = {k: flat[k] for k in _LLAMA_FIELDS if k in flat and flat[k] is not None}
    kwargs.setdefault("hidden_act", "silu")
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    if "rope_scaling" in flat and flat["rope_scaling"] is not None:
        raise UnsupportedCheckpoint(f"{where}/config.json: rope_scaling {flat['rope_scaling']!r} is not supported")
    rope_theta = kwargs.pop("rope_theta", 10000.0)
    try:
        cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, use_cache=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised typed
        raise UnreadableFile(f"{where}/config.json: not a Llama configuration ({exc})") from exc
    if hasattr(cfg, "rope_parameters") and isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters["rope_theta"] = float(rope_theta)
    else:
        cfg.rope_theta = float(rope_theta)
    return cfg


def _clip_vision_config(clip_dir: Path | None, source: TensorSource | None, prefix: str, notes: list[str]):
    """transformers' ``CLIPVisionConfig``: from the ``--clip`` folder, or (CLIP held by the checkpoint, no folder
    given) from the tensor shapes with OpenAI CLIP's fixed settings (64-wide heads, quick_gelu, eps 1e-5)."""
    from transformers import CLIPVisionConfig

    if clip_dir is not None:
        cfg = _read_json(clip_dir / "config.json")
        vc = cfg.get("vision_config") if cfg.get("model_type") == "clip" else cfg
        if not isinstance(vc, dict) or not isinstance(vc.get("hidden_size", 768), int):
            raise UnreadableFile(f"{clip_dir}/config.json: not a CLIP (vision) configuration")
        try:
            with quiet_transformers():
                return CLIPVisionConfig.from_pretrained(clip_dir)
        except Exception as exc:  # noqa: BLE001 - re-raised typed
            raise UnreadableFile(f"{clip_dir}: cannot read its CLIP vision configuration ({exc})") from exc
    keys = [k for k in source.keys() if k.startswith(prefix)]
    patch = source.info(prefix + "embeddings.patch_embedding.weight").shape
    pos = source.info(prefix + "embeddings.position_embedding.weight").shape
    layers = len({k[len(prefix):].split(".")[2] for k in keys if k.startswith(prefix + "encoder.layers.")})
    fc1 = source.info(prefix + "encoder.layers.0.mlp.fc1.weight").shape
    hidden, p = patch[0], patch[2]
    side = int(round((pos[0] - 1) ** 0.5))
    if (hidden, layers, fc1[0], p) != (1024, 24, 4096, 14) or side * p not in (224, 336):
        raise MissingInput("--clip is required: the checkpoint holds CLIP's weights but not its configuration, and "
                           f"they are not OpenAI's CLIP ViT-L/14 (hidden {hidden}, {layers} layers, patch {p})")
    notes.append(f"CLIP configuration: OpenAI's CLIP ViT-L/14 at {side * p} px, recognised from the checkpoint's "
                 "shapes (16 heads, quick_gelu, eps 1e-5); pass --clip to read it from the CLIP folder instead")
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=fc1[0], num_hidden_layers=layers,
                            num_attention_heads=16, image_size=side * p, patch_size=p, projection_dim=768,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _check_sentencepiece(tokenizer, folder: Path, notes: list[str]) -> None:
    """When ``sentencepiece`` is installed and the folder has ``tokenizer.model``: check that the exported code's
    encoding of text pieces (``modeling_lisa.sentencepiece_ids``) equals SentencePiece's own, as LISA's slow
    tokenizer computes it, on probe strings; a difference is an error (the export would feed other ids)."""
    tc = folder / "tokenizer_config.json"
    if tc.is_file() and _read_json(tc).get("legacy") is False:
        notes.append(f"{folder.name}/tokenizer_config.json sets legacy=false; the export encodes prompts as the "
                     "legacy slow Llama tokenizer does (transformers 4.31's default, LISA's released folders)")
    model = folder / "tokenizer.model"
    if not model.is_file():
        notes.append(f"{folder.name} has no tokenizer.model: the prompt encoding was not checked against "
                     "SentencePiece")
        return
    try:
        import sentencepiece as spm
    except ImportError:
        notes.append("sentencepiece is not installed: the prompt encoding was not checked against SentencePiece")
        return
    from .remote.modeling_lisa import sentencepiece_ids

    sp = spm.SentencePieceProcessor(model_file=str(model))
    probes = ["A chat between a curious human and an artificial intelligence assistant. USER:",
              "Can you segment the dog in this image? ASSISTANT:", "Sure, it is [SEG] .", " leading space",
              "two  spaces and\nnew line", "Ünïcödé 中文 🙂 123", "  ", "x"]
    differ = [text for text in probes if sentencepiece_ids(tokenizer, text) != list(sp.encode(text))]
    if len(differ) == len(probes):
        raise UnreadableFile(f"{folder}: the tokenizer transformers builds from tokenizer.model encodes no probe text "
                             "as SentencePiece (LISA's slow tokenizer) does; the export would not feed LISA's ids")
    if differ:
        notes.append(f"WARNING: the export's prompt encoding differs from SentencePiece (LISA's slow tokenizer) on "
                     f"{len(differ)} of {len(probes)} probe texts ({', '.join(repr(t) for t in differ)}): prompts "
                     "with such text get other ids than in LISA")
    else:
        notes.append("prompt encoding checked against SentencePiece (LISA's slow tokenizer) on probe strings")


def _lora(ckpt_view: TensorSource, cfg: TrainingConfig, options: ConvertOptions, notes: list[str]):
    a_keys = [k for k in ckpt_view.keys() if k.endswith(".lora_A.default.weight")]
    ranks = {ckpt_view.info(k).shape[0] for k in a_keys}
    if len(ranks) > 1:
        raise ShapeMismatch(f"LoRA ranks differ between layers ({sorted(ranks)}); per-layer ranks are not supported")
    r = ranks.pop() if ranks else None
    if r is None:
        return None, None, None, "no LoRA tensors"
    if options.lora_r is not None and options.lora_r != r:
        raise ShapeMismatch(f"--lora-r {options.lora_r} but the checkpoint's lora_A tensors have rank {r}")
    if options.lora_alpha is not None:
        alpha, where = options.lora_alpha, "flags"
    elif cfg.lora_alpha is not None:
        alpha, where = cfg.lora_alpha, cfg.found_in.get("lora", "training config")
    else:
        alpha, where = DEFAULT_LORA_ALPHA, "LISA's default"
        notes.append(f"LoRA r={r} read from the tensors; alpha {DEFAULT_LORA_ALPHA} is LISA's train_ds.py default "
                     "(DeepSpeed does not save it): pass --lora-alpha if the run used another")
    try:
        return r, alpha, lora_scaling(alpha, r, False), where
    except ValueError as exc:
        raise MissingInput(f"--lora-alpha: {exc}") from None


def _open_clip(options: ConvertOptions, view: TensorSource, notes: list[str]):
    """(clip_from, the clip source or None, CLIPVisionConfig): CLIP from the checkpoint/folder when it holds it,
    else the ``--clip`` folder."""
    in_view = any(k.startswith(CKPT_CLIP) for k in view.keys())
    clip_dir = Path(options.clip) if options.clip is not None else None
    if clip_dir is not None and not clip_dir.is_dir():
        raise MissingInput(f"CLIP folder {clip_dir} does not exist")
    clip_src = open_hf_folder(clip_dir, name="clip", allow_unsafe_pickle=options.allow_unsafe_pickle) \
        if clip_dir is not None else None
    if not in_view and clip_src is None:
        raise MissingInput("--clip is required: the CLIP vision folder LISA's LLaVA uses (openai/clip-vit-large-patch14"
                           "; the checkpoint does not hold CLIP's weights)")
    if clip_src is not None and not in_view and not any(k.startswith("vision_model.") for k in clip_src.keys()):
        raise WrongFamily(f"{clip_dir}: no vision_model.* tensors; not a CLIP folder")
    vision = _clip_vision_config(clip_dir, view, CKPT_CLIP, notes)
    return (None if in_view else "clip"), clip_src, vision


def _open_sam(options: ConvertOptions, sam_view: TensorSource, notes: list[str]):
    """(sam_from, Meta's checkpoint or None, preset name, SamConfig)."""
    holds_encoder = any(k.startswith("image_encoder.") for k in sam_view.keys())
    sam_src = open_sam_checkpoint(options.sam, allow_unsafe_pickle=options.allow_unsafe_pickle) \
        if getattr(options, "sam", None) is not None else None
    if not holds_encoder and sam_src is None:
        raise MissingInput("--sam is required: Meta's SAM checkpoint the run started from (sam_vit_h_4b8939.pth; the "
                           "checkpoint holds SAM's mask decoder only)")
    preset, spec = sam_spec_of(sam_view if holds_encoder else sam_src)
    notes.append(f"SAM {preset} recognised from the tensor shapes of "
                 + ("the checkpoint's own SAM" if holds_encoder else Path(options.sam).name))
    return (None if holds_encoder else "sam"), sam_src, preset, hf_sam_config(spec)


class Lisa(Family):
    spec = SPEC

    # ---- training runs -----------------------------------------------------------------------------------------
    @staticmethod
    def _prefix(ckpt: TrainingCheckpoint) -> str | None:
        """``base_model.model.`` for a peft-wrapped run (LoRA), ``""`` for one trained without LoRA (LISA's
        ``--lora_r 0``: no peft wrapper), ``None`` when the keys are not LISA's."""
        keys = ckpt.source.keys()
        for prefix in (PEFT, ""):
            if any(k.startswith(prefix + SAM_PREFIX) for k in keys) and any(
                    k.startswith(prefix + "model.text_hidden_fcs.") for k in keys):
                return prefix
        return None

    def claims(self, ckpt: TrainingCheckpoint) -> bool:
        return self._prefix(ckpt) is not None

    def prepare(self, ckpt: TrainingCheckpoint, cfg: TrainingConfig, options: ConvertOptions) -> Prepared:
        notes: list[str] = []
        if options.base is None:
            raise MissingInput("--base is required: the LLaVA folder the LISA run started from (e.g. "
                               "LLaVA-Lightning-7B-v1-1 or llava-llama-2-13b-chat-lightning-preview)")
        base_dir = Path(options.base)
        if not base_dir.is_dir():
            raise MissingInput(f"base model folder {base_dir} does not exist")
        base_cfg = _read_json(base_dir / "config.json")
        base = open_hf_folder(base_dir, allow_unsafe_pickle=options.allow_unsafe_pickle)
        prefix = self._prefix(ckpt)
        if prefix is None:
            raise WrongFamily(f"{ckpt.source.path}: no model.visual_model.* / model.text_hidden_fcs.* tensors (under "
                              f"{PEFT!r} or unprefixed): not a LISA training checkpoint")
        view, sam_view = split_views(ckpt.source, prefix, "ckpt", "ckpt_sam")
        keys = set(view.keys())
        llm_in_ckpt = "model.layers.0.mlp.down_proj.weight" in keys
        projector_in_ckpt = "model.mm_projector.weight" in keys
        clip_from, clip_src, vision = _open_clip(options, view, notes)
        sam_from, sam_src, preset, sam_config = _open_sam(options, sam_view, notes)
        r, alpha, scaling, lora_where = _lora(view, cfg, options, notes)
        if not llm_in_ckpt and "model.layers.0.mlp.down_proj.weight" not in base:
            raise WrongFamily(f"{base_dir}: no model.layers.* tensors; not a LLaVA (Llama) folder")
        tokenizer = self._tokenizer(base_dir, options.special_tokens or cfg.special_tokens or [SEG], notes)
        sources: dict[str, Any] = {"ckpt": view, "ckpt_sam": sam_view, "base": base}
        if clip_src is not None:
            sources["clip"] = clip_src
        if sam_src is not None:
            sources["sam"] = sam_src
        llm_from = "ckpt" if llm_in_ckpt else "base"
        config, expected, vocab = self._export_config(
            base_cfg, base_dir, view, tokenizer, vision, sam_config, preset, notes,
            projector_source=view if projector_in_ckpt else base, extra={"lora_r": r})
        sources["identity"] = IdentitySource(config.mllm_config.text_config.hidden_size)
        table = rules(lora_scaling=scaling, llm_from=llm_from,
                      projector_from="ckpt" if projector_in_ckpt else "base",
                      clip_from=clip_from or "ckpt", sam_from=sam_from or "ckpt_sam", inputs=tuple(sources),
                      base_has_lm_head="lm_head.weight" in base)
        settings = {"lora": {"r": r, "alpha": alpha, "use_rslora": False, "scaling": scaling, "source": lora_where},
                    "seg_token_id": config.seg_token_id, "vocab_size": vocab, "sam_preset": preset,
                    "frozen_parts_from": {"llm": llm_from, "projector": "ckpt" if projector_in_ckpt else "base",
                                          "clip": clip_from or "ckpt", "sam": sam_from or "ckpt"},
                    "template": config.template["name"]}

        def write_files(out: Path) -> list[str]:
            return write_export_files(out, spec=SPEC, config=config, tokenizer=tokenizer, base_dir=base_dir,
                                      template=TEMPLATE)

        return Prepared(sources=sources, rules=table, expected=expected, export_config=config.to_dict(),
                        write_files=write_files, notes=notes, settings=settings)

    # ---- released LISA folders ---------------------------------------------------------------------------------
    def claims_released(self, folder_config: dict) -> bool:
        if not isinstance(folder_config, dict) or folder_config.get("model_type") != "llava":
            return False
        if isinstance(folder_config.get("text_config"), dict):
            return False
        archs = folder_config.get("architectures")
        return (isinstance(archs, list) and "LISAForCausalLM" in archs) or (
            "out_dim" in folder_config and "train_mask_decoder" in folder_config)

    def prepare_released(self, src_dir: Path, options: ConvertOptions) -> Prepared:
        notes: list[str] = []
        src_dir = Path(src_dir)
        src_cfg = _read_json(src_dir / "config.json")
        folder = open_hf_folder(src_dir, allow_unsafe_pickle=options.allow_unsafe_pickle)
        view, sam_view = split_views(folder, "", "base", "base_sam")
        for key in ("model.embed_tokens.weight", "lm_head.weight", "model.mm_projector.weight",
                    "model.text_hidden_fcs.0.0.weight", "model.text_hidden_fcs.0.2.weight"):
            if key not in view:
                raise UnreadableFile(f"{src_dir}: tensor {key!r} is missing: not a released LISA folder")
        if not any(k.startswith("image_encoder.") for k in sam_view.keys()):
            raise UnreadableFile(f"{src_dir}: no model.visual_model.image_encoder.* tensors: not a released LISA folder")
        clip_from, clip_src, vision = _open_clip(options, view, notes)
        preset, spec = sam_spec_of(sam_view)
        notes.append(f"SAM {preset} recognised from the tensor shapes of the folder's model.visual_model.*")
        with quiet_transformers():
            tokenizer = self._load_tokenizer(src_dir)
        missing = [t for t in (SEG, IM_START, IM_END) if tokenizer.convert_tokens_to_ids(t) in
                   (None, tokenizer.unk_token_id)]
        if missing:
            raise UnreadableFile(f"{src_dir}: the tokenizer lacks LISA's tokens {missing}: not a released LISA folder?")
        _check_sentencepiece(tokenizer, src_dir, notes)
        sources: dict[str, Any] = {"base": view, "base_sam": sam_view}
        if clip_src is not None:
            sources["clip"] = clip_src
        config, expected, vocab = self._export_config(
            src_cfg, src_dir, view, tokenizer, vision, hf_sam_config(spec), preset, notes, projector_source=view,
            extra={"released_folder": src_dir.name},
            im_start_end=src_cfg.get("mm_use_im_start_end", True) is not False)  # LISA's own config.json
        sources["identity"] = IdentitySource(config.mllm_config.text_config.hidden_size)
        table = rules(lora_scaling=None, llm_from="base", projector_from="base", clip_from=clip_from or "base",
                      sam_from="base_sam", inputs=tuple(sources), src="base", src_sam="base_sam")
        settings = {"seg_token_id": config.seg_token_id, "vocab_size": vocab, "sam_preset": preset,
                    "template": config.template["name"], "base_layout": "released LISA folder"}

        def write_files(out: Path) -> list[str]:
            return write_export_files(out, spec=SPEC, config=config, tokenizer=tokenizer, base_dir=src_dir,
                                      template=TEMPLATE)

        return Prepared(sources=sources, rules=table, expected=expected, export_config=config.to_dict(),
                        write_files=write_files, notes=notes, settings=settings)

    # ---- shared ------------------------------------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(folder: Path):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - re-raised typed
            raise UnreadableFile(f"{folder}: cannot load its tokenizer ({exc})") from exc
        if tok.pad_token is None and tok.unk_token is not None:
            tok.pad_token = tok.unk_token  # LISA: tokenizer.pad_token = tokenizer.unk_token
        return tok

    def _tokenizer(self, base_dir: Path, seg_tokens: list[str], notes: list[str]):
        """The base's tokenizer with LISA's tokens added as its train_ds.py adds them: ``[SEG]`` (a plain added
        token), then ``<im_start>``, ``<im_end>`` (special); tokens the base already has keep their ids."""
        with quiet_transformers():
            tok = self._load_tokenizer(base_dir)
        if SEG not in seg_tokens:
            raise MissingInput(f"the special tokens {seg_tokens} do not include {SEG}")
        tok.add_tokens(list(seg_tokens))
        tok.add_tokens([IM_START, IM_END], special_tokens=True)
        _check_sentencepiece(tok, base_dir, notes)
        return tok

    def _export_config(self, flat_cfg: dict, where: Path, view: TensorSource, tokenizer, vision, sam_config,
                       preset: str, notes: list[str], *, projector_source: TensorSource, extra: dict,
                       im_start_end: bool = True):
        from transformers import LlavaConfig

        from ... import __version__
        from .remote.configuration_lisa import LisaConfig
        from .remote.modeling_lisa import LisaModel

        vocab = view.info("model.embed_tokens.weight").shape[0]
        llama = _llama_config(flat_cfg, vocab, where)
        hidden = llama.hidden_size
        c_in = view.info("model.text_hidden_fcs.0.0.weight").shape[1]
        if c_in != hidden:
            raise ShapeMismatch(f"text_hidden_fcs takes {c_in} features but the LLM's hidden size is {hidden} "
                                f"({where.name}): wrong --base?")
        out_dim = view.info("model.text_hidden_fcs.0.2.weight").shape[0]
        if "model.mm_projector.weight" not in projector_source:
            kinds = sorted({k.split(".")[2] for k in projector_source.keys() if k.startswith("model.mm_projector.")})
            raise UnsupportedCheckpoint(f"no one-linear projector model.mm_projector.weight (found mm_projector parts "
                                        f"{kinds or 'none'}); family {NAME} maps LISA's single linear projector")
        proj = projector_source.info("model.mm_projector.weight").shape
        if tuple(proj) != (hidden, vision.hidden_size):
            raise ShapeMismatch(f"model.mm_projector.weight is {tuple(proj)}, expected ({hidden}, {vision.hidden_size}) "
                                "for this LLM and CLIP: wrong --clip or --base?")
        seg_id = tokenizer.convert_tokens_to_ids(SEG)
        if len(tokenizer) != vocab:
            raise ShapeMismatch(f"the tokenizer has {len(tokenizer)} tokens but the trained embeddings {vocab} rows: "
                                "the base tokenizer does not match the run's (LISA adds [SEG], <im_start>, <im_end>)")
        if tokenizer.unk_token_id is None:
            raise UnreadableFile(f"{where}: the tokenizer has no unk token (LISA's Llama tokenizer has <unk>)")
        layer = flat_cfg.get("mm_vision_select_layer", -2)
        if not isinstance(layer, int):
            raise UnreadableFile(f"{where}/config.json: mm_vision_select_layer {layer!r} is not an integer")
        grid = (vision.image_size // vision.patch_size) ** 2
        mllm = LlavaConfig(text_config=llama.to_dict(), vision_config=vision.to_dict(),
                           image_token_id=int(tokenizer.unk_token_id), projector_hidden_act="linear",
                           vision_feature_layer=layer, vision_feature_select_strategy="default",
                           image_seq_length=grid, multimodal_projector_bias=True, tie_word_embeddings=False)
        mllm_dict = mllm.to_dict()
        mllm_dict["text_config"]["tie_word_embeddings"] = False
        template = {}
        if not im_start_end:  # LISA's --use_mm_start_end False: no <im_start>/<im_end> around the image
            template = {"im_start": "", "im_end": ""}
            notes.append(f"{where.name}/config.json: mm_use_im_start_end is false: the image is not wrapped in "
                         "<im_start>/<im_end>")
        config = LisaConfig(
            mllm_config=mllm_dict, sam_config=sam_config.to_dict(), seg_token=SEG, seg_token_id=int(seg_id),
            added_tokens=[SEG, IM_START, IM_END], template=template, image_processor={"crop_size": vision.image_size,
                                                                  "shortest_edge": vision.image_size},
            text_hidden_fcs_out_dim=out_dim,
            maskport={"version": __version__, "family": NAME, "mapping_version": SPEC.mapping_version,
                      "sam_preset": preset, **extra},
        )
        config.architectures = [SPEC.model_class]
        config.auto_map = dict(SPEC.auto_map)
        notes.append("LISA's one-linear projector -> LlavaMultiModalProjector: linear_1 = it, projector_hidden_act "
                     "'linear', linear_2 = identity with zero bias (exact)")
        return config, target_shapes(LisaModel, config), vocab
