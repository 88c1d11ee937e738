"""Family ``sa2va-internvl``: Sa2VA fine-tuned on an InternVL base (InternVL2.5 / InternVL3) with SAM2.

Language models: Qwen2 (Sa2VA-1B/4B, Sa2VA-InternVL3-2B/8B/14B) and InternLM2 (Sa2VA-8B/26B; exported in
Llama's layout, see :mod:`maskport.families.sa2va_internvl.internlm2_llama`).

Sources:
- ``ckpt``: the training checkpoint (trainable subset): LoRA of the LLM under
  ``mllm.model.language_model.base_model.model.``, ``modules_to_save`` copies of the embeddings / LM head (v2) or
  full trained copies (v1), the projector ``mllm.model.mlp1.{0,1,3}.*``, SAM2's mask decoder, ``text_hidden_fcs``;
- ``base``: the InternVL folder as OpenGVLab publishes it: remote-code layout (``vision_model.*`` InternViT with a
  fused ``attn.qkv``, ``mlp1.*``, ``language_model.*``), or transformers' native ``-hf`` layout
  (``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``);
- ``sam2``: Meta's SAM2 checkpoint.

Target: ``Sa2VAInternVLModel`` (``maskport/export/sa2va_internvl``): ``mllm.*`` (transformers'
``InternVLForConditionalGeneration``), ``sam2.*`` (``Sam2Model``), ``text_hidden_fcs.*``.
"""

from __future__ import annotations

from pathlib import Path


from ...convert.rules import Drop
from ...convert.sources import TensorSource, TrainingCheckpoint, open_hf_folder
from ...convert.training_config import TrainingConfig
from ...errors import MissingInput, ShapeMismatch, UnreadableFile, WrongFamily
from ...heads import sam2 as sam2map
from ...heads.sam2 import open_sam2, sam2_normalization
from .. import Family
from .._common import lora_settings, plain, quiet_transformers, read_json, target_shapes, write_export_files
from ..spec import ConvertOptions, Prepared
from . import internlm2_llama
from .mapping import NATIVE, PEFT, REMOTE, BaseLayout, rules
from .spec import SPEC

NAME = SPEC.name
DEFAULT_SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]


# --------------------------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------------------------
def vision_config(intern_vit: dict) -> dict:
    """InternViT's ``vision_config`` (remote code) -> transformers' ``InternVLVisionConfig`` fields."""
    c = intern_vit
    size = int(c.get("image_size", 448))
    patch = int(c.get("patch_size", 14))
    return {
        "hidden_size": int(c["hidden_size"]), "num_hidden_layers": int(c["num_hidden_layers"]),
        "num_attention_heads": int(c["num_attention_heads"]), "intermediate_size": int(c["intermediate_size"]),
        "attention_bias": bool(c.get("qkv_bias", True)), "use_qk_norm": bool(c.get("qk_normalization", False)),
        "norm_type": c.get("norm_type", "layer_norm"), "layer_norm_eps": float(c.get("layer_norm_eps", 1e-6)),
        "hidden_act": c.get("hidden_act", "gelu"), "image_size": [size, size], "patch_size": [patch, patch],
        "num_channels": int(c.get("num_channels", 3)), "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,  # = no final LayerNorm, as InternViT's last_hidden_state has none
        "use_mask_token": False, "layer_scale_init_value": float(c.get("initializer_factor", 0.1)),
        "attention_dropout": 0.0, "projection_dropout": 0.0, "hidden_dropout_prob": 0.0,
    }


def _detect_layout(base_cfg: dict, base_dir: Path) -> tuple[str, str, dict, dict]:
    """(layout, llm kind, vision config, LLM config dict) of an InternVL base folder."""
    mt = base_cfg.get("model_type")
    if mt in ("internvl_chat", "sa2va_chat"):  # sa2va_chat: a released Sa2VA folder (same layout + SAM2)
        llm_cfg = dict(base_cfg.get("llm_config") or {})
        vis = vision_config(base_cfg.get("vision_config") or {})
        if base_cfg.get("ps_version", "v2") != "v2":
            raise WrongFamily(f"{base_dir}: ps_version {base_cfg.get('ps_version')!r}; only InternVL's v2 pixel "
                              "shuffle (InternVL1.5 and later) is supported")
        if int(base_cfg.get("force_image_size") or vis["image_size"][0]) != vis["image_size"][0]:
            raise WrongFamily(f"{base_dir}: force_image_size differs from the vision tower's image_size")
        layout = REMOTE
    elif mt == "internvl":
        llm_cfg = dict(base_cfg.get("text_config") or {})
        vis = dict(base_cfg.get("vision_config") or {})
        layout = NATIVE
    else:
        raise WrongFamily(f"base folder {base_dir} holds a {mt!r} model; family {NAME} needs an InternVL base "
                          "(e.g. OpenGVLab/InternVL2_5-4B or InternVL3-2B, remote-code or -hf layout)")
    arch = " ".join(llm_cfg.get("architectures") or []) + " " + str(llm_cfg.get("model_type", ""))
    if "InternLM2" in arch or "internlm2" in arch:
        llm = "internlm2"
    elif "Qwen2" in arch or "qwen2" in arch:
        llm = "qwen2"
    elif "llama" in arch.lower() and layout == NATIVE:
        raise WrongFamily(f"{base_dir}: an InternVL -hf folder with a Llama language model (InternLM2 converted "
                          "by transformers) is not supported yet; use the remote-code folder")
    else:
        raise WrongFamily(f"{base_dir}: language model {arch.strip()!r} is not supported "
                          "(supported: Qwen2 and InternLM2)")
    return layout, llm, vis, llm_cfg


def _open_base(base_dir: Path, layout: str, llm: str, allow_unsafe_pickle: bool) -> tuple[TensorSource, BaseLayout]:
    src = open_hf_folder(base_dir, allow_unsafe_pickle=allow_unsafe_pickle)
    keys = src.keys()
    if layout == REMOTE:
        head = "language_model.output.weight" if llm == "internlm2" else "language_model.lm_head.weight"
        if not any(k.startswith("vision_model.") for k in keys) or not any(k.startswith("mlp1.") for k in keys):
            raise WrongFamily(f"{base_dir}: config says remote-code InternVL but the weights have no "
                              "vision_model.* / mlp1.* tensors")
        return src, BaseLayout(REMOTE, "base:language_model.", "base:language_model.model.", "base:" + head,
                               head in src)
    if not any(k.startswith("model.vision_tower.") for k in keys):
        # transformers 4.5x saved -hf folders in the llava-style layout: present them under the module names
        from ...convert.sources import RenamedSource

        rename = {}
        for k in keys:
            if k.startswith("language_model.model."):
                rename[k] = "model.language_model." + k[len("language_model.model."):]
            elif k.startswith("language_model.lm_head."):
                rename[k] = k[len("language_model."):]
            elif k.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")):
                rename[k] = "model." + k
            else:
                rename[k] = k
        src = RenamedSource(src, rename, src.description + " (llava-style layout, keys normalised)")
    return src, BaseLayout(NATIVE, "base:model.language_model.", "base:model.language_model.", "base:lm_head.weight",
                           "lm_head.weight" in src)


def _load_tokenizer(base_dir: Path, llm: str):
    from transformers import AutoTokenizer

    if llm == "internlm2":
        from . import internlm2_tokenizer

        with quiet_transformers():
            return internlm2_tokenizer.load(base_dir)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)  # never run a folder's code
    except Exception as exc:  # noqa: BLE001 - re-raised typed
        raise UnreadableFile(f"{base_dir}: cannot load its tokenizer ({exc})") from exc


def _export(*, base_dir: Path, base_cfg: dict, layout: str, llm: str, vis_cfg: dict, llm_cfg: dict, vocab: int,
            tokenizer, special: list[str], seg_id: int, image_token_id: int, template_in, sam2_config, preset: str,
            out_dim: int, notes: list[str], normalization: str = "sa2va"):
    """The export's config, the target model's tensor shapes, and the function writing the non-weight files."""
    from transformers import InternVLConfig

    from .remote.configuration_sa2va_internvl import Sa2VAInternVLConfig, normalize_template
    from .remote.modeling_sa2va_internvl import Sa2VAInternVLModel

    # 6. the export config
    if llm == "internlm2":
        text_cfg = internlm2_llama.llama_config(llm_cfg, vocab_size=vocab)
    else:
        text_cfg = {k: v for k, v in llm_cfg.items() if not k.startswith("_")}
        text_cfg.update(model_type="qwen2", vocab_size=vocab, tie_word_embeddings=False,
                        architectures=["Qwen2ForCausalLM"])
    if layout == REMOTE:
        ratio = float(base_cfg.get("downsample_ratio", 0.5))
        select_layer = int(base_cfg.get("select_layer", -1))
    else:
        ratio = float(base_cfg.get("downsample_ratio", 0.5))
        select_layer = int(base_cfg.get("vision_feature_layer", -1))
    vis_size, patch = vis_cfg["image_size"], vis_cfg["patch_size"]
    vis_size = vis_size[0] if isinstance(vis_size, (list, tuple)) else vis_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    per_tile = int((vis_size // patch) ** 2 * ratio ** 2)
    mllm_config = InternVLConfig(vision_config=vis_cfg, text_config=text_cfg, image_token_id=image_token_id,
                                 image_seq_length=per_tile, downsample_ratio=ratio, projector_hidden_act="gelu",
                                 vision_feature_layer=select_layer, vision_feature_select_strategy="default",
                                 tie_word_embeddings=False)
    template = template_in if template_in is not None else ("internlm2_chat" if llm == "internlm2" else "qwen_chat")
    if template_in is None:
        notes.append(f"no chat template given: using {template}")
    try:
        template = normalize_template(plain(template))
    except ValueError as exc:
        raise UnreadableFile(f"chat template: {exc}") from None
    image_processor = {"image_size": vis_size}
    for key in ("min_dynamic_patch", "max_dynamic_patch", "use_thumbnail"):
        if key in base_cfg:
            image_processor[key] = base_cfg[key]
    from ... import __version__

    config = Sa2VAInternVLConfig(
        mllm_config=mllm_config.to_dict(), sam2_config=sam2_config.to_dict(), seg_token="[SEG]",
        seg_token_id=seg_id, special_tokens=list(special), template=template, image_processor=image_processor,
        add_bos_token=llm == "internlm2", text_hidden_fcs_out_dim=out_dim, **sam2_normalization(normalization),
        maskport={"version": __version__, "family": NAME, "mapping_version": SPEC.mapping_version,
                  "sam2_preset": preset, "base_layout": layout, "llm": llm})
    config.architectures = [SPEC.model_class]
    config.auto_map = dict(SPEC.auto_map)
    expected = target_shapes(Sa2VAInternVLModel, config)

    def write_files(out: Path) -> list[str]:
        return write_export_files(out, spec=SPEC, config=config, tokenizer=tokenizer, base_dir=base_dir,
                                  template=template)

    return config, expected, write_files, text_cfg, template


TRAINABLE_PREFIXES = ("mllm.model.language_model.base_model.", "mllm.model.mlp1.",
                      "grounding_encoder.sam2_model.sam_mask_decoder.", "text_hidden_fcs.")


def _chain_pretrained(ckpt: TrainingCheckpoint, base: TensorSource, sam2: TensorSource, path: Path, layout: str,
                      allow_unsafe_pickle: bool, notes: list[str]):
    """Put an earlier checkpoint (Sa2VA's ``pretrained_pth``) between the training checkpoint and the base.

    Precedence: this run's checkpoint > the earlier checkpoint > the base folder / SAM2 ``.pt``. The earlier
    checkpoint's tensors in the trainable key space (LoRA, ``modules_to_save``, projector, mask decoder,
    ``text_hidden_fcs``) sit under this run's (a tensor both have is superseded by this run's); its other
    ``mllm.model.*`` tensors replace the base's, its other ``grounding_encoder.sam2_model.*`` tensors replace
    SAM2's. Every replaced tensor is dropped with that reason, so the report still accounts for all of them."""
    from ...convert.overlay import overlay
    from ...convert.sources import RenamedSource, open_training_checkpoint

    if layout != REMOTE:
        raise WrongFamily("--pretrained-pth is supported with a remote-code InternVL base only (its keys are in "
                          "that layout)")
    pre = open_training_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle).source
    keys = pre.keys()
    trainable = [k for k in keys if k.startswith(TRAINABLE_PREFIXES)]
    g = "grounding_encoder.sam2_model."
    to_base = [k for k in keys if k.startswith("mllm.model.") and k not in trainable]
    to_sam2 = [k for k in keys if k.startswith(g) and k not in trainable]
    other = sorted(set(keys) - set(trainable) - set(to_base) - set(to_sam2))
    if other:
        raise ShapeMismatch(f"{path}: tensors outside mllm.model.* / grounding_encoder.sam2_model.* / "
                            f"text_hidden_fcs.*: {other[:3]} (not a Sa2VA checkpoint?)")
    what = f"--pretrained-pth {path.name}"
    ck, ck_hidden, p1 = overlay(RenamedSource(pre, {k: k for k in trainable}, f"{path.name} (trainable part)"),
                                ckpt.source, "this run's checkpoint")
    b, b_hidden, p2 = overlay(base, RenamedSource(pre, {k: k[len("mllm.model."):] for k in to_base},
                                                  f"{path.name} (MLLM)"), what)
    sm, s_hidden, p3 = overlay(sam2, RenamedSource(pre, {k: k[len(g):] for k in to_sam2}, f"{path.name} (SAM2)"),
                               what)
    for problem in (p1 + p2 + p3)[:5]:  # e.g. embeddings resized for the added tokens; the plan checks what is used
        notes.append(problem)
    notes.append(f"{what}: {len(b_hidden.keys())} base and {len(s_hidden.keys())} SAM2 tensors taken from it; "
                 f"{len(ck_hidden.keys())} of its trained tensors superseded by this run's")
    sources = {"pretrained_superseded": ck_hidden, "base_replaced": b_hidden, "sam2_replaced": s_hidden}
    drops = [Drop("pretrained_superseded:{rest}", reason="the earlier checkpoint's copy, trained further by this run",
                  optional=True),
             Drop("base_replaced:{rest}", reason=f"replaced by {what} (the run started from it)", optional=True),
             Drop("sam2_replaced:{rest}", reason=f"replaced by {what} (the run started from it)", optional=True)]
    return TrainingCheckpoint(ck, ckpt.format, ckpt.meta, ckpt.files), b, sm, sources, drops


class Sa2VAInternVL(Family):
    spec = SPEC

    def claims(self, ckpt: TrainingCheckpoint) -> bool:
        keys = ckpt.source.keys()
        return any(k.startswith("mllm.model.language_model.base_model.model.") for k in keys) and any(
            k.startswith("text_hidden_fcs.") for k in keys)

    def prepare(self, ckpt: TrainingCheckpoint, cfg: TrainingConfig, options: ConvertOptions) -> Prepared:
        notes: list[str] = []
        # 1. the base folder: layout and language model
        if options.base is None:
            raise MissingInput("--base is required: the InternVL folder the run fine-tuned"
                               + (f" (the training config names {cfg.base_path!r})" if cfg.base_path else
                                  " (e.g. OpenGVLab/InternVL2_5-4B)"))
        base_dir = Path(options.base)
        if not base_dir.is_dir():
            raise MissingInput(f"base model folder {base_dir} does not exist")
        base_cfg = read_json(base_dir / "config.json")
        layout, llm, vis_cfg, llm_cfg = _detect_layout(base_cfg, base_dir)
        base, where = _open_base(base_dir, layout, llm, options.allow_unsafe_pickle)
        notes.append(f"base: InternVL, {layout} layout, {llm} language model")

        # 2. SAM2
        sam2, preset, sam2_config = open_sam2(options, notes)

        # 2b. a chained fine-tune: the run started from an earlier checkpoint (--pretrained-pth)
        extra_sources, extra_rules = {}, []
        if options.pretrained_pth is not None:
            ckpt, base, sam2, extra_sources, extra_rules = _chain_pretrained(
                ckpt, base, sam2, Path(options.pretrained_pth), layout, options.allow_unsafe_pickle, notes)
        elif cfg.pretrained_pth:
            notes.append(f"the training config names pretrained_pth={cfg.pretrained_pth!r}: the run started from it. "
                         "Its tensors are in this checkpoint only where this run trained them; pass "
                         "--pretrained-pth with that file to export the others from it instead of from the base")

        # 3. sizes implied by the checkpoint, checked against the base
        keys = set(ckpt.source.keys())
        hidden = int(llm_cfg["hidden_size"])
        if "text_hidden_fcs.0.weight" in keys:
            c_in = ckpt.source.info("text_hidden_fcs.0.weight").shape[1]
            if c_in != hidden:
                raise ShapeMismatch(f"the checkpoint was trained on an LLM of hidden size {c_in} "
                                    f"(text_hidden_fcs.0.weight), but the base {base_dir.name} has {hidden}: wrong --base?")
        out_dim = (ckpt.source.info("text_hidden_fcs.2.weight").shape[0] if "text_hidden_fcs.2.weight" in keys
                   else 256)
        peft = PEFT.split(":", 1)[1]
        embed_name = "tok_embeddings" if llm == "internlm2" else "embed_tokens"
        embed_keys = [k for k in (f"{peft}model.{embed_name}.modules_to_save.default.weight",
                                  f"{peft}model.{embed_name}.weight") if k in keys]
        base_embed = where.decoder.split(":", 1)[1] + embed_name + ".weight"
        vocab = (ckpt.source.info(embed_keys[0]).shape[0] if embed_keys else
                 base.info(base_embed).shape[0] if base_embed in base else int(llm_cfg["vocab_size"]))
        lora_modules = {k[len(peft) + len("model.layers."):].split(".", 1)[1].rsplit(".lora_A", 1)[0]
                        for k in keys if k.startswith(peft + "model.layers.") and ".lora_A." in k}
        head_name = "output" if llm == "internlm2" else "lm_head"
        head_lora_base = None
        if f"{peft}{head_name}.lora_A.default.weight" in keys:  # LoRA on the head (older v1 InternLM2 runs)
            trained = [PEFT + f"{head_name}.{w}" for w in ("base_layer.weight", "weight")
                       if f"{peft}{head_name}.{w}" in keys]
            if trained:
                head_lora_base = trained[0]
            elif where.has_lm_head:
                head_lora_base = where.lm_head
            else:
                raise ShapeMismatch(f"the checkpoint has LoRA on {head_name} but neither it nor the base holds the "
                                    f"head's weight (a tied head cannot take a LoRA of its own)")
            notes.append(f"LoRA on the LM head ({head_name}): merged into "
                         f"{'the trained head in the checkpoint' if trained else 'the base head'}")
        unknown_lora = [k for k in keys if k.startswith(peft) and ".lora_" in k
                        and not k.startswith((peft + "model.layers.", f"{peft}{head_name}.lora_"))]
        if unknown_lora:
            raise ShapeMismatch(f"LoRA outside the decoder layers and the LM head is not supported: "
                                f"{unknown_lora[:3]}")
        projector_trained = any(k.startswith("mllm.model.mlp1.") for k in keys)
        if not projector_trained:
            notes.append("the checkpoint has no projector (mlp1): the base's is exported")

        # 4. LoRA scaling
        r, alpha, rslora, scaling = lora_settings(ckpt, cfg, options)

        # 5. tokenizer: the base's (InternLM2: converted to a fast tokenizer), plus Sa2VA's added tokens
        special = options.special_tokens or cfg.special_tokens or DEFAULT_SPECIAL_TOKENS
        if "[SEG]" not in special:
            raise MissingInput(f"the special tokens {special} do not include [SEG]")
        tokenizer = _load_tokenizer(base_dir, llm)
        tokenizer.add_tokens(special, special_tokens=True)
        seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
        if seg_id >= vocab:
            raise ShapeMismatch(f"[SEG] gets id {seg_id} but the trained embeddings have only {vocab} rows: "
                                "the base tokenizer does not match the one used in training")
        ctx_token = "<IMG_CONTEXT>"
        image_token_id = tokenizer.convert_tokens_to_ids(ctx_token)
        if not isinstance(image_token_id, int) or image_token_id == tokenizer.unk_token_id or image_token_id >= vocab:
            raise UnreadableFile(f"{base_dir}: the tokenizer has no {ctx_token} token (not an InternVL tokenizer?)")
        if len(tokenizer) != vocab:
            notes.append(f"tokenizer has {len(tokenizer)} tokens, embeddings {vocab} rows (padded vocabulary)")

        # 6. the export config
        config, expected, write_files, text_cfg, template = _export(
            base_dir=base_dir, base_cfg=base_cfg, layout=layout, llm=llm, vis_cfg=vis_cfg, llm_cfg=llm_cfg,
            vocab=vocab, tokenizer=tokenizer, special=special, seg_id=seg_id, image_token_id=image_token_id,
            template_in=cfg.template, sam2_config=sam2_config, preset=preset, out_dim=out_dim, notes=notes,
            normalization=options.sam2_normalization)

        settings = {
            "lora": {"r": r, "alpha": alpha, "use_rslora": rslora, "scaling": scaling, "modules": sorted(lora_modules),
                     "source": "flags" if options.lora_alpha is not None else cfg.found_in.get("lora")},
            "special_tokens": special, "seg_token_id": seg_id, "vocab_size": vocab, "image_token_id": image_token_id,
            "sam2_preset": preset, "template": template, "base_model_type": base_cfg.get("model_type"),
            "base_layout": layout, "llm": llm, "training_config_base_path": cfg.base_path,
        }
        table = rules(layout, llm, base=where, projector_trained=projector_trained, lora_modules=lora_modules,
                      head_lora_base=head_lora_base, lora_scaling=scaling, text_cfg=llm_cfg if llm != "internlm2" else {
                          "num_attention_heads": text_cfg["num_attention_heads"],
                          "num_key_value_heads": text_cfg["num_key_value_heads"]})
        return Prepared(sources={"ckpt": ckpt.source, "base": base, "sam2": sam2, **extra_sources},
                        rules=[*table, *extra_rules],
                        expected=expected, export_config=config.to_dict(), write_files=write_files, notes=notes,
                        settings=settings)


    # ---- released Sa2VA HF folders (ByteDance/Sa2VA-*) ------------------------------------------------------
    def claims_released(self, folder_config: dict) -> bool:
        return folder_config.get("model_type") == "sa2va_chat" and "llm_config" in folder_config

    def prepare_released(self, src_dir: Path, options: ConvertOptions) -> Prepared:
        """A released Sa2VA folder (``Sa2VAChatModel``: ``vision_model.*``, ``language_model.*``, ``mlp1.*``,
        ``grounding_encoder.sam2_model.*`` in Meta's SAM2 names with ``g_weight`` for the layer-scale ``gamma``,
        ``text_hidden_fcs.*``) -> the same native export as a converted training checkpoint. The folder's remote
        code is never run: its config is read as JSON."""
        from ...convert.sources import RenamedSource

        notes: list[str] = []
        src_cfg = read_json(src_dir / "config.json")
        layout, llm, vis_cfg, llm_cfg = _detect_layout(src_cfg, src_dir)
        folder, where = _open_base(src_dir, layout, llm, options.allow_unsafe_pickle)
        keys = folder.keys()
        gprefix = "grounding_encoder.sam2_model."
        sam_keys = [k for k in keys if k.startswith(gprefix)]
        if not sam_keys or not any(k.startswith("text_hidden_fcs.") for k in keys):
            raise WrongFamily(f"{src_dir}: no grounding_encoder.sam2_model.* / text_hidden_fcs.* tensors: not a "
                              "released Sa2VA folder (for a plain InternVL base, convert a training checkpoint)")
        # Sa2VA's HF code renamed SAM2's 'gamma' parameters to 'g_weight' (transformers' loader renames 'gamma')
        sam2 = RenamedSource(folder, {k: k[len(gprefix):].replace(".g_weight", ".gamma") for k in sam_keys},
                             f"SAM2 inside {src_dir.name} (grounding_encoder.sam2_model.*, g_weight -> gamma)")
        base = RenamedSource(folder, {k: k for k in keys if not k.startswith(gprefix)},
                             f"{src_dir.name} without SAM2")
        preset, _, sam2_config = sam2map.sam2_architecture(sam2, options)  # --sam2-config: Meta's YAML or JSON
        embed = where.decoder.split(":", 1)[1] + ("tok_embeddings.weight" if llm == "internlm2" else "embed_tokens.weight")
        vocab = base.info(embed).shape[0]
        hidden = int(llm_cfg["hidden_size"])
        c_in = base.info("text_hidden_fcs.0.weight").shape[1]
        if c_in != hidden:
            raise ShapeMismatch(f"text_hidden_fcs.0.weight takes {c_in} features but the LLM's hidden size is {hidden}")
        out_dim = base.info("text_hidden_fcs.2.weight").shape[0]
        special = DEFAULT_SPECIAL_TOKENS
        tokenizer = _load_tokenizer(src_dir, llm)
        missing = [t for t in special if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise UnreadableFile(f"{src_dir}: the tokenizer lacks Sa2VA's tokens {missing}: not a released Sa2VA folder?")
        seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
        image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        if seg_id >= vocab or image_token_id >= vocab:
            raise ShapeMismatch(f"token ids ([SEG] {seg_id}, <IMG_CONTEXT> {image_token_id}) exceed the {vocab} "
                                "embedding rows")
        template = src_cfg.get("template")
        from .remote.configuration_sa2va_internvl import TEMPLATES

        if template not in TEMPLATES:
            notes.append(f"the folder's template {template!r} is not one Sa2VA trains with; using the default")
            template = None
        config, expected, write_files, text_cfg, template = _export(
            base_dir=src_dir, base_cfg=src_cfg, layout=layout, llm=llm, vis_cfg=vis_cfg, llm_cfg=llm_cfg,
            vocab=vocab, tokenizer=tokenizer, special=special, seg_id=seg_id, image_token_id=image_token_id,
            template_in=template, sam2_config=sam2_config, preset=preset, out_dim=out_dim, notes=notes,
            normalization=options.sam2_normalization)
        table = rules(layout, llm, base=where, projector_trained=False, lora_modules=set(),
                      text_cfg={"num_attention_heads": text_cfg["num_attention_heads"],
                                "num_key_value_heads": text_cfg["num_key_value_heads"]},
                      fcs_source="base", decoder_from=None)
        settings = {"special_tokens": special, "seg_token_id": seg_id, "vocab_size": vocab,
                    "image_token_id": image_token_id, "sam2_preset": preset, "template": template,
                    "base_model_type": src_cfg.get("model_type"), "base_layout": "released Sa2VA folder", "llm": llm}
        return Prepared(sources={"base": base, "sam2": sam2}, rules=table, expected=expected,
                        export_config=config.to_dict(), write_files=write_files, notes=notes, settings=settings)

    def training_layout(self, export_config: dict):
        from .mapping import training_layout

        text = ((export_config.get("mllm_config") or {}).get("text_config") or {})
        llm = (export_config.get("maskport") or {}).get("llm")
        if llm not in ("qwen2", "internlm2") or "num_attention_heads" not in text:
            raise UnreadableFile("the export's config.json has no maskport.llm / mllm_config.text_config: not an "
                                 f"export of family {NAME}?")
        heads = int(text["num_attention_heads"])
        return training_layout(llm, heads, int(text.get("num_key_value_heads") or heads))
