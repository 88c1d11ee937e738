"""Sa2VA on InternVL (InternVL2.5 / InternVL3, Qwen2 or InternLM2 language model), as exported by maskport
(family ``sa2va-internvl``).

Copied verbatim into every export folder and loaded with ``AutoModel.from_pretrained(folder,
trust_remote_code=True)`` on machines without maskport: it imports only torch, transformers, numpy, PIL and its
siblings ``configuration_sa2va_internvl`` and the shared heads ``image_utils``, ``seg_token``, ``sam2_image``.

Module tree (the converter writes weights under exactly these names)::

    mllm             transformers.InternVLForConditionalGeneration   mllm.model.vision_tower.*,
                                                                        mllm.model.multi_modal_projector.*,
                                                                        mllm.model.language_model.*, mllm.lm_head.weight
    sam2             transformers.Sam2VideoModel                          sam2.*
    text_hidden_fcs  Linear(C, C) -> ReLU -> Linear(C, D) -> Dropout(0)

InternLM2 language models are exported in Llama's layout (``wqkv`` split per key-value group into q/k/v), so
the language model is always a stock transformers class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import InternVLForConditionalGeneration, PreTrainedModel

from .configuration_sa2va_internvl import Sa2VAInternVLConfig
from .image_utils import module_device_dtype, to_rgb
from .sam2_image import Sam2ImageHeadMixin
from .sam2_video import Sam2VideoHeadMixin, build_sam2_video
from .seg_token import SegTokenMixin


# --------------------------------------------------------------------------------------------------------------
# InternVL's dynamic tiling (pure functions)
# --------------------------------------------------------------------------------------------------------------
def tile_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Every (columns, rows) grid with ``min_num <= columns*rows <= max_num``, ordered by tile count. Within one
    count the order is that of a Python ``set`` of int tuples (deterministic), which decides ties exactly as
    InternVL's ``dynamic_preprocess`` does."""
    grids = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if min_num <= i * j <= max_num)
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, grids: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's; on a tie the later (more tiles) grid wins when the
    image has more than half the pixels of that grid's tiles (InternVL's ``find_closest_aspect_ratio``)."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(image: Image.Image, min_num: int = 1, max_num: int = 12, tile: int = 448,
                  use_thumbnail: bool = True) -> list[Image.Image]:
    """Resize to the chosen grid (PIL bicubic) and cut it into ``tile`` x ``tile`` tiles, row by row; with more
    than one tile and ``use_thumbnail``, the whole image resized to one tile goes last."""
    cols, rows = choose_grid(image.width, image.height, tile_grids(min_num, max_num), tile)
    resized = image.resize((tile * cols, tile * rows), resample=Image.BICUBIC)
    tiles = [resized.crop(((k % cols) * tile, (k // cols) * tile, (k % cols + 1) * tile, (k // cols + 1) * tile))
             for k in range(cols * rows)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile, tile), resample=Image.BICUBIC))
    return tiles


def tiles_to_pixel_values(tiles: list[Image.Image], tile: int, mean, std) -> torch.Tensor:
    """``[n, 3, tile, tile]`` float32: each tile resized to ``tile`` (bicubic; a no-op for tiles of that size),
    /255, normalised."""
    out = []
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    for t in tiles:
        if t.size != (tile, tile):
            t = t.resize((tile, tile), resample=Image.BICUBIC)
        x = torch.from_numpy(np.asarray(t, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        out.append((x - m) / s)
    return torch.stack(out)


def build_prompt(template: dict, text: str, past_text: str = "", image_tokens: str | None = None,
                 placeholder: str = "<image>") -> str:
    """``past_text`` + the template's user turn around ``text``; ``image_tokens`` (``<img>`` + context tokens +
    ``</img>``) replaces the ``<image>`` placeholder, which is put first (with a newline) when the text has none.
    No system turn: Sa2VA's InternVL inference renders only the instruction."""
    text = text or ""
    if image_tokens is not None:
        if placeholder not in text:
            text = placeholder + "\n" + text
        text = text.replace(placeholder, image_tokens)
    else:
        text = text.replace(placeholder, "")
    return (past_text or "") + template["user"].replace("{input}", text)


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------
class Sa2VAInternVLModel(SegTokenMixin, Sam2ImageHeadMixin, Sam2VideoHeadMixin, PreTrainedModel):
    """Sa2VA (InternVL + SAM2) for referring segmentation and grounded chat; see ``predict_forward``."""

    config_class = Sa2VAInternVLConfig
    base_model_prefix = "sa2va_internvl"
    main_input_name = "input_ids"
    _no_split_modules = ["InternVLVisionLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer", "Sam2VideoModel"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    supports_gradient_checkpointing = False
    _checkpoint_conversion_mapping: dict = {}

    def __init__(self, config: Sa2VAInternVLConfig):
        super().__init__(config)
        self.mllm = InternVLForConditionalGeneration(config.mllm_config)
        self.sam2 = build_sam2_video(config.sam2_config)
        in_dim = config.mllm_config.text_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, config.text_hidden_fcs_out_dim),
            nn.Dropout(0.0))
        self.post_init()
        # our files use the module names; saving must not apply transformers' legacy-layout renamings
        self._weight_conversions = []

    def get_input_embeddings(self):
        return self.mllm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.mllm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.mllm.get_output_embeddings()

    def forward(self, *args, **kwargs):
        raise NotImplementedError("Sa2VAInternVLModel has no training forward; use predict_forward(image=..., "
                                  "text=..., tokenizer=...) or the submodules mllm / sam2 / text_hidden_fcs")

    def mllm_pixel_values(self, image: Image.Image) -> torch.Tensor:
        """``[n_tiles, 3, 448, 448]`` InternVL input (``dynamic_tiles`` + normalisation), in the vision tower's
        device and dtype."""
        s = self.config.image_processor
        tiles = dynamic_tiles(to_rgb(image), int(s["min_dynamic_patch"]), int(s["max_dynamic_patch"]),
                              int(s["image_size"]), bool(s["use_thumbnail"]))
        device, dtype = module_device_dtype(self.mllm.model.vision_tower)
        return tiles_to_pixel_values(tiles, int(s["image_size"]), s["image_mean"], s["image_std"]).to(
            device=device, dtype=dtype)

    def image_token_string(self, n_tiles: int) -> str:
        s = self.config.image_processor
        per_tile = int(self.config.mllm_config.image_seq_length)
        return s["img_start_token"] + s["img_context_token"] * (per_tile * n_tiles) + s["img_end_token"]

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
        key_frames: str = "official",
        num_key_frames: int | None = None,
    ) -> dict[str, Any]:
        """Answer ``text`` about ``image`` (or ``video``) and segment every ``[SEG]`` of the answer.

        ``video``: a list of frames (PIL images or HxWx3 uint8 arrays), a folder of frame images or a video file
        (PyAV); masks are then ``(T, H, W)`` per ``[SEG]``. ``key_frames='official'`` (default) sends the first 5
        frames through the MLLM, as Sa2VA's released code; ``'uniform'`` sends ``num_key_frames`` (default 5)
        frames spread over the video. See ``sam2_video`` and ``seg_token.predict_video``.

        Returns ``{"prediction": str, "prediction_masks": [np.bool_ (1, H, W) per [SEG]]}`` (plus
        ``"prediction_probabilities"`` when asked); text-only calls return ``prediction_masks == []``. Lists of
        images and texts run as one batch (``predict_batch``) and return a list of such dicts.

        Steps (Sa2VA's released InternVL HF code, ``Sa2VAChatModel.predict_forward``):

        1. Image for the MLLM: ``dynamic_tiles`` (448 px tiles, 1..12, + thumbnail), ImageNet normalisation.
           Prompt: ``<image>`` in ``text`` becomes ``<img>`` + ``<IMG_CONTEXT>`` * 256 * n_tiles + ``</img>``
           (put first, with a newline, when the text has no ``<image>``: ours), wrapped in the template's
           instruction after ``past_text``; BOS first when ``config.add_bos_token`` (InternLM2).
        2. Image for SAM2: square resize to ``sam2_image_size``, /255, ImageNet normalisation.
        3. Greedy ``mllm.generate`` with hidden states; the last-layer hidden state at each generated ``[SEG]``
           -> ``text_hidden_fcs``.
        4. SAM2 with the embedding as a prompt (best of the multi-mask outputs), bilinear to the SAM2 size then to
           H x W, sigmoid, ``> mask_threshold``.
        """
        if video is not None and not isinstance(text, (list, tuple)):  # a video: see predict_video
            _, tokenizer = self.check_predict_inputs(image, video, text, mask_prompts, tokenizer, processor)
            if return_probabilities:
                raise NotImplementedError("return_probabilities is for images; a video returns boolean masks")
            return self.predict_video(video, text, past_text, tokenizer, processor, key_frames, num_key_frames,
                                      mask_threshold, max_new_tokens, generation_kwargs)
        if isinstance(text, (list, tuple)):  # a batch: see predict_batch
            if video is not None or mask_prompts is not None:
                raise NotImplementedError("batched prediction takes images and texts only")
            images = list(image) if isinstance(image, (list, tuple)) else [image] * len(text)
            return self.predict_batch(images, text, tokenizer=tokenizer, processor=processor,
                                      past_texts=[past_text] * len(text), mask_threshold=mask_threshold,
                                      return_probabilities=return_probabilities, max_new_tokens=max_new_tokens,
                                      generation_kwargs=generation_kwargs)
        image, tokenizer = self.check_predict_inputs(image, video, text, mask_prompts, tokenizer, processor)
        device, _ = module_device_dtype(self.mllm)

        ids, mm = self.prompt_inputs(image, text, past_text, tokenizer, processor)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        attention_mask = torch.ones_like(input_ids)

        return self.generate_and_segment(input_ids, attention_mask, mm, tokenizer, image, mask_threshold,
                                         max_new_tokens, generation_kwargs, return_probabilities)

    def prompt_inputs(self, image, text: str, past_text: str, tokenizer, processor=None):
        """(token ids of the prompt, ``{"pixel_values": tiles}`` or ``{}``) for one sample: step 1 of
        ``predict_forward``."""
        mm: dict[str, torch.Tensor] = {}
        image_tokens = None
        if image is not None:
            mm["pixel_values"] = self.mllm_pixel_values(image)
            image_tokens = self.image_token_string(mm["pixel_values"].shape[0])
        prompt = build_prompt(self.config.template, text, past_text, image_tokens,
                              self.config.image_processor.get("image_placeholder", "<image>"))
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if self.config.add_bos_token and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        return ids, mm

    def video_prompt_inputs(self, frames: list, text: str, past_text: str, tokenizer, processor=None):
        """(token ids, ``{"pixel_values"}``) for a video's key frames, as Sa2VA's InternVL code builds them: each
        frame one 448 px tile (square bicubic resize, no tiling, no thumbnail), and ``<image>`` replaced by one
        ``<img>`` + 256 ``<IMG_CONTEXT>`` + ``</img>`` block per frame, the blocks joined by newlines."""
        s = self.config.image_processor
        tile = int(s["image_size"])
        device, dtype = module_device_dtype(self.mllm.model.vision_tower)
        pixel_values = tiles_to_pixel_values([to_rgb(f) for f in frames], tile, s["image_mean"], s["image_std"])
        image_tokens = "\n".join([self.image_token_string(1)] * len(frames))
        prompt = build_prompt(self.config.template, text, past_text, image_tokens,
                              s.get("image_placeholder", "<image>"))
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if self.config.add_bos_token and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        return ids, {"pixel_values": pixel_values.to(device=device, dtype=dtype)}

    @staticmethod
    def concat_mm_inputs(mms: list) -> dict[str, torch.Tensor]:
        """The tiles of several samples as one batch (InternVL fills the image-context tokens in order)."""
        return {"pixel_values": torch.cat([m["pixel_values"] for m in mms])}


__all__ = ["Sa2VAInternVLModel", "build_prompt", "dynamic_tiles", "tile_grids", "choose_grid"]
