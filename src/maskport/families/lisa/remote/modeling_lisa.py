"""LISA (reasoning segmentation: LLaVA v1 + SAM ViT-H + ``[SEG]``), as exported by maskport (family ``lisa``).

This file is copied verbatim into every export folder and loaded with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` on machines without maskport: it may import only
torch, transformers, numpy, PIL and its siblings ``configuration_lisa`` and the shared heads ``image_utils``,
``seg_token`` and ``sam_image``.

Module tree (the converter writes weights under exactly these names)::

    mllm             transformers.LlavaForConditionalGeneration   mllm.model.language_model.* (Llama),
                                                                   mllm.model.vision_tower.* (CLIP ViT-L/14),
                                                                   mllm.model.multi_modal_projector.*,
                                                                   mllm.lm_head.weight
    sam              transformers.SamModel                         sam.*
    text_hidden_fcs  Linear(C, C) -> ReLU -> Linear(C, 256) -> Dropout(0)   text_hidden_fcs.{0,2}.*

Inference follows LISA's ``chat.py`` + ``LISAForCausalLM.evaluate``; ``predict_forward`` documents every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import LlavaForConditionalGeneration, PreTrainedModel, SamModel

from .configuration_lisa import LisaConfig
from .image_utils import module_device_dtype, to_rgb
from .sam_image import SamImageHeadMixin
from .seg_token import SegTokenMixin

SPIECE_UNDERLINE = "\u2581"


# --------------------------------------------------------------------------------------------------------------
# helpers (pure functions, unit-tested on their own)
# --------------------------------------------------------------------------------------------------------------
def build_prompt(template: dict, text: str, past_text: str = "", with_image: bool = True) -> str:
    """LISA's prompt for one turn (``chat.py``): ``"<image>\\n" + text`` (unless the text already holds
    ``<image>``), ``<image>`` -> ``<im_start><image><im_end>``, in the ``llava_v1`` conversation (separator style
    TWO): ``system + " " + "USER: " + turn + " " + "ASSISTANT:"``. ``past_text`` is put before the text.
    Without an image every ``<image>`` is removed."""
    placeholder = template["image_placeholder"]
    turn = (past_text or "") + (text or "")
    if with_image:
        if placeholder not in turn:
            turn = placeholder + "\n" + turn
        turn = turn.replace(placeholder, template["im_start"] + placeholder + template["im_end"])
    else:
        turn = turn.replace(placeholder, "")
    user, assistant = template["roles"]
    return template["system"] + template["sep"] + user + ": " + turn + template["sep"] + assistant + ":"


def sentencepiece_ids(tokenizer, text: str) -> list[int]:
    """``text`` encoded as LISA's slow Llama tokenizer (transformers 4.31, legacy mode) encodes a piece between
    added tokens: SentencePiece with its dummy prefix, i.e. ``"\u2581" + text`` with spaces as ``\u2581``, cut by
    the BPE model alone. A fast tokenizer's own pre-tokenizer skips the prefix when the text starts with a space;
    the backend's BPE model is called directly to avoid that. A slow tokenizer's ``sp_model`` is used as is."""
    if not text:
        return []
    sp = getattr(tokenizer, "sp_model", None)
    if sp is not None:
        return list(sp.encode(text))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__}: neither a SentencePiece model nor a tokenizers backend")
    return [t.id for t in backend.model.tokenize(SPIECE_UNDERLINE + text.replace(" ", SPIECE_UNDERLINE))]


def split_at_tokens(text: str, words: list[str]) -> list[str]:
    """``[text, token, text, token, ..., text]``: ``text`` cut at each occurrence of one of ``words``, scanning left
    to right and taking the longest word that starts at a position (``words`` sorted longest first)."""
    parts, start, i = [], 0, 0
    while i < len(text):
        hit = next((w for w in words if w and text.startswith(w, i)), None)
        if hit is None:
            i += 1
            continue
        parts += [text[start:i], hit]
        i += len(hit)
        start = i
    return parts + [text[start:]]


def lisa_prompt_ids(tokenizer, prompt: str, *, image_placeholder: str, image_token_id: int, image_tokens: int,
                    stripped_tokens: list[str]) -> list[int]:
    """Token ids of a LISA prompt, as LISA's ``tokenizer_image_token`` with its slow tokenizer computes them:

    - BOS, then the prompt split at ``<image>``; each image becomes ``image_tokens`` placeholder ids (LISA inserts
      one ``IMAGE_TOKEN_INDEX`` that LLaVA expands into the image features; here the placeholders are there from
      the start and transformers' LLaVA scatters the features into them);
    - each text chunk is split at the tokenizer's added and special tokens (longest first); the whitespace around
      each of ``stripped_tokens`` is dropped (transformers 4.31 strips both sides of added tokens given as plain
      strings: ``"USER: <im_start>"`` loses its space, ``"<im_end>\\n..."`` its newline); the pieces between are
      encoded with :func:`sentencepiece_ids`."""
    specials = {t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) if t}
    stripped = [t for t in stripped_tokens if t]
    words = sorted(set(stripped) | specials | set(getattr(tokenizer, "added_tokens_encoder", {}) or {}),
                   key=lambda w: (-len(w), w))
    ids: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(int(tokenizer.bos_token_id))
    for n, chunk in enumerate(prompt.split(image_placeholder)):
        if n:
            ids.extend([int(image_token_id)] * int(image_tokens))
        parts = split_at_tokens(chunk, words)
        # parts alternate text, token, text, ...: strip the text around each stripped token
        for i in range(1, len(parts), 2):
            if parts[i] in stripped:
                parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(int(tokenizer.convert_tokens_to_ids(part)))
            else:
                ids.extend(sentencepiece_ids(tokenizer, part))
    return ids


def clip_shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the shorter side ``shortest_edge`` and the longer ``int(edge * long / short)``, as
    transformers 4.31's ``get_resize_output_image_size(default_to_square=False)`` computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(shortest_edge), int(int(shortest_edge) * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def clip_preprocess(image: Image.Image, settings: dict) -> torch.Tensor:
    """``[1, 3, crop, crop]`` float32 CLIP input, as LISA's ``CLIPImageProcessor.preprocess`` (transformers 4.31,
    on the uint8 RGB array) computes it: PIL bicubic resize of the shorter side to ``shortest_edge``, centre crop
    (top/left offsets ``(size - crop) // 2``), ``x * (1/255)`` (float64, stored as float32), then
    ``(x - mean) / std`` in float32."""
    rgb = to_rgb(image)
    h, w = clip_shortest_edge_size(rgb.height, rgb.width, settings["shortest_edge"])
    if (h, w) != (rgb.height, rgb.width):
        rgb = rgb.resize((w, h), resample=int(settings.get("resample", 3)), reducing_gap=None)
    arr = np.asarray(rgb, dtype=np.uint8)
    crop = int(settings["crop_size"])
    top, left = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
    if top < 0 or left < 0:
        raise ValueError(f"image of {arr.shape[1]}x{arr.shape[0]} is smaller than the {crop} px crop after resizing")
    arr = arr[top:top + crop, left:left + crop]
    x = (arr * float(settings["rescale_factor"])).astype(np.float32)
    mean = np.asarray(settings["image_mean"], dtype=np.float32)
    std = np.asarray(settings["image_std"], dtype=np.float32)
    x = (x - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def lisa_seg_positions(sequence: torch.Tensor, seg_token_id: int) -> torch.Tensor:
    """Positions whose hidden state LISA projects, for a (prompt + answer) id sequence in which every image
    already occupies its placeholder positions: each position ``p`` whose NEXT token is ``[SEG]`` (LISA's
    ``output_ids[:, 1:] == seg_token_idx``, shifted by its 255 image positions), i.e. the hidden state that
    predicted ``[SEG]``. As in LISA, every ``[SEG]`` of the sequence counts, the prompt's too."""
    return torch.nonzero(sequence[1:] == int(seg_token_id), as_tuple=False).flatten()


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------
class LisaModel(SegTokenMixin, SamImageHeadMixin, PreTrainedModel):
    """LISA (LLaVA + SAM) for reasoning segmentation; see ``predict_forward``."""

    config_class = LisaConfig
    base_model_prefix = "lisa"
    main_input_name = "input_ids"
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "SamModel"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    supports_gradient_checkpointing = False
    _checkpoint_conversion_mapping: dict = {}

    def __init__(self, config: LisaConfig):
        super().__init__(config)
        self.mllm = LlavaForConditionalGeneration(config.mllm_config)
        self.sam = SamModel(config.sam_config)
        in_dim = config.mllm_config.text_config.hidden_size
        out_dim = config.text_hidden_fcs_out_dim
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim), nn.Dropout(0.0))
        self.post_init()
        # our files use the module names; transformers' legacy LLaVA renamings must not be reversed when saving
        self._weight_conversions = []

    # ---- plumbing ----------------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.mllm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.mllm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.mllm.get_output_embeddings()

    def forward(self, *args, **kwargs):
        raise NotImplementedError("LisaModel has no training forward; use predict_forward(image=..., text=..., "
                                  "tokenizer=...) or the submodules mllm / sam / text_hidden_fcs")

    @property
    def image_seq_length(self) -> int:
        vc = self.config.mllm_config.vision_config
        n = (int(vc.image_size) // int(vc.patch_size)) ** 2
        return n if self.config.mllm_config.vision_feature_select_strategy == "default" else n + 1

    # ---- MLLM inputs ---------------------------------------------------------------------------------------------
    def prompt_inputs(self, image, text: str, past_text: str, tokenizer, processor=None):
        """(prompt token ids, ``{"pixel_values": ...}`` or ``{}``) for one sample: steps 1-2 of
        ``predict_forward``."""
        tpl = self.config.template
        prompt = build_prompt(tpl, text, past_text, with_image=image is not None)
        ids = lisa_prompt_ids(tokenizer, prompt, image_placeholder=tpl["image_placeholder"],
                              image_token_id=self.config.mllm_config.image_token_id,
                              image_tokens=self.image_seq_length, stripped_tokens=list(self.config.added_tokens))
        mm = {"pixel_values": clip_preprocess(image, self.config.image_processor)} if image is not None else {}
        return ids, mm

    @staticmethod
    def concat_mm_inputs(mms: list) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.cat([m["pixel_values"] for m in mms])}

    @torch.no_grad()
    def seg_embeddings(self, sequence: torch.Tensor, pixel_values: torch.Tensor | None, seg_token_id: int):
        """``text_hidden_fcs`` of LISA's ``[SEG]`` hidden states for one (prompt + answer) sequence ``[L]``.

        LISA generates with ``use_cache=False``: its last generation step runs the model over the whole sequence
        but its last token, and ``evaluate`` reads that step's last-layer hidden states (after the final norm).
        Here the same forward is run once more after generation: ``mllm.model`` over ``sequence[:-1]`` (with the
        image), last hidden state, rows at :func:`lisa_seg_positions`."""
        positions = lisa_seg_positions(sequence, seg_token_id)
        if positions.numel() == 0:
            return None
        device, _ = module_device_dtype(self.mllm)
        fed = sequence[:-1].to(device)[None]
        kwargs = {}
        if pixel_values is not None:
            _, dtype = module_device_dtype(self.mllm.model.vision_tower)
            kwargs["pixel_values"] = pixel_values.to(device=device, dtype=dtype)
        out = self.mllm.model(input_ids=fed, attention_mask=torch.ones_like(fed), use_cache=False, **kwargs)
        hidden = out.last_hidden_state[0, positions.to(out.last_hidden_state.device)]
        fcs_device, fcs_dtype = module_device_dtype(self.text_hidden_fcs)
        return self.text_hidden_fcs(hidden.to(device=fcs_device, dtype=fcs_dtype))

    def sam_postprocess(self, logits: torch.Tensor, input_size: tuple[int, int],
                        original_size: tuple[int, int]) -> torch.Tensor:
        """LISA's ``Sam.postprocess_masks`` in SAM's own dtype: LISA runs SAM in bf16/fp16 and interpolates those
        logits without casting (bilinear to the SAM size, crop, bilinear to H x W); float32 result. For a float32
        SAM this is the head's float32 post-processing."""
        _, dtype = module_device_dtype(self.sam)
        if dtype == torch.float32:
            return super().sam_postprocess(logits, input_size, original_size)
        size = int(self.config.sam_image_size)
        lead = logits.shape[:-2]
        x = logits.reshape(-1, 1, *logits.shape[-2:]).to(dtype)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]
        x = F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)
        return x.float().reshape(*lead, *x.shape[-2:])

    # ---- inference -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_forward(
        self,
        image: Image.Image | list | None = None,
        video: Any = None,
        text: str | list | None = None,
        past_text: str = "",
        mask_prompts: Any = None,
        tokenizer=None,
        processor=None,
        mask_threshold: float | None = None,
        return_probabilities: bool = False,
        max_new_tokens: int | None = None,
        generation_kwargs: dict | None = None,
    ) -> dict[str, Any]:
        """Answer ``text`` about ``image`` and segment every ``[SEG]`` of the answer.

        Returns ``{"prediction": str, "prediction_masks": [np.bool_ (1, H, W) per [SEG]]}`` (H, W: the input
        image's size), plus ``"prediction_probabilities": [np.float32 (1, H, W)]`` when ``return_probabilities``.
        Text-only calls (``image=None``) return ``prediction_masks == []``.

        Steps (LISA's ``chat.py`` and ``LISAForCausalLM.evaluate``):

        1. Prompt: :func:`build_prompt` (``llava_v1``, ``<im_start><image><im_end>``), token ids as LISA's slow
           tokenizer gives them (:func:`lisa_prompt_ids`; the image as ``image_seq_length`` placeholder ids).
        2. Images: CLIP input by :func:`clip_preprocess`; SAM input by ``sam_preprocess`` (ResizeLongestSide to
           ``sam_image_size``, (x - mean) / std on 0-255, zero padding to a square).
        3. Greedy ``mllm.generate`` (stop on ``</s>``); the answer decoded with special tokens kept, stripped.
        4. ``[SEG]`` embeddings: the last-layer hidden state one position BEFORE each ``[SEG]`` (the state that
           predicted it), from one forward over the final sequence (:meth:`seg_embeddings`), through
           ``text_hidden_fcs``.
        5. SAM: the embedding is the ONLY sparse prompt (no padding point), ``no_mask_embed`` the dense one,
           ``multimask_output=False``; ``postprocess_masks`` (bilinear to the SAM size, crop, bilinear to H x W);
           mask = ``logits > 0`` (``mask_threshold`` 0.5 on the sigmoid).

        ``generation_kwargs`` go to ``generate`` and override the defaults (e.g. ``use_cache=False`` runs the
        generation exactly as LISA does, recomputing the whole sequence at each step). Lists of images and texts
        run one by one (``predict_batch``).
        """
        if isinstance(text, (list, tuple)):
            if video is not None or mask_prompts is not None:
                raise NotImplementedError("batched prediction takes images and texts only")
            images = list(image) if isinstance(image, (list, tuple)) else [image] * len(text)
            return self.predict_batch(images, text, tokenizer=tokenizer, processor=processor,
                                      past_texts=[past_text] * len(text), mask_threshold=mask_threshold,
                                      return_probabilities=return_probabilities, max_new_tokens=max_new_tokens,
                                      generation_kwargs=generation_kwargs)
        image, tokenizer = self.check_predict_inputs(image, video, text, mask_prompts, tokenizer, processor)
        device, dtype = module_device_dtype(self.mllm)
        ids, mm = self.prompt_inputs(image, text, past_text, tokenizer, processor)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        pixel_values = mm.get("pixel_values")
        gen_inputs = {}
        if pixel_values is not None:
            _, vdtype = module_device_dtype(self.mllm.model.vision_tower)
            gen_inputs["pixel_values"] = pixel_values.to(device=device, dtype=vdtype)
        threshold = self.config.mask_threshold if mask_threshold is None else float(mask_threshold)
        max_new = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        stop_ids = self.stop_token_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
        gen_kwargs = dict(max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=stop_ids or None,
                          pad_token_id=pad_id, use_cache=True)
        gen_kwargs.update(generation_kwargs or {})
        gen_kwargs.update(return_dict_in_generate=False, output_hidden_states=False)
        sequences = self.mllm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       **gen_inputs, **gen_kwargs)
        prompt_length = input_ids.shape[1]
        result: dict[str, Any] = {
            "prediction": tokenizer.decode(sequences[0, prompt_length:], skip_special_tokens=False).strip(),
            "prediction_masks": []}
        if return_probabilities:
            result["prediction_probabilities"] = []
        if image is None:
            return result
        emb = self.seg_embeddings(sequences[0], pixel_values, self.seg_token_id(tokenizer))
        if emb is None:
            return result
        masks, probs = self.masks_from_prompts(image, emb, threshold, return_probabilities)
        result["prediction_masks"] = masks
        if return_probabilities:
            result["prediction_probabilities"] = probs
        return result

    def predict_batch(self, images, texts, tokenizer=None, processor=None, past_texts=None, mask_threshold=None,
                      return_probabilities: bool = False, max_new_tokens=None, generation_kwargs=None) -> list:
        """``predict_forward`` for several samples, one after the other (LISA's ``[SEG]`` states come from a
        forward over each sample's own sequence)."""
        images, texts = list(images), list(texts)
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        past_texts = [""] * len(texts) if past_texts is None else list(past_texts)
        if len(past_texts) != len(texts):
            raise ValueError(f"{len(past_texts)} past_texts for {len(texts)} texts")
        return [self.predict_forward(image=im, text=tx, past_text=pt or "", tokenizer=tokenizer, processor=processor,
                                     mask_threshold=mask_threshold, return_probabilities=return_probabilities,
                                     max_new_tokens=max_new_tokens, generation_kwargs=generation_kwargs)
                for im, tx, pt in zip(images, texts, past_texts)]


__all__ = ["LisaModel", "build_prompt", "clip_preprocess", "clip_shortest_edge_size", "lisa_prompt_ids",
           "lisa_seg_positions", "sentencepiece_ids", "split_at_tokens"]
