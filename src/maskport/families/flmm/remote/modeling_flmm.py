"""F-LMM (a frozen LMM grounded by a mask head on its attention maps, refined by SAM), as exported by maskport
(family ``flmm``).

This file is copied verbatim into every export folder and loaded with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` on machines without maskport: it may import only
torch, transformers, numpy, PIL and its siblings ``configuration_flmm``, ``image_utils`` and ``sam_image``.

Module tree (the converter writes weights under exactly these names)::

    mllm                transformers' native LMM (LlavaForConditionalGeneration), frozen, as released
    sam                 transformers.SamModel (ViT-L): Meta's image encoder, F-LMM's trained prompt encoder and
                        mask decoder
    mask_head           FLMMMaskHead: the U-Net on the attention maps (F-LMM's mmseg ``UNetHead``)
    text_layer_weights  [num_layers]: softmaxed weights of the per-layer hidden states
    text_proj           Linear(hidden, 256): the phrase embedding SAM gets as extra sparse tokens

What each piece corresponds to in F-LMM (read in its repository: ``flmm/models/frozen_llava.py``
``FrozenLlavaSAM._forward``, ``flmm/models/mask_head/mask_decoder.py`` ``UNetHead``,
``flmm/models/mask_head/mask_refiner.py`` ``SAMWrapper``, ``flmm/datasets/llava_processors.py``; written anew here
in plain torch, nothing copied):

1. Input: the prompt (xtuner's ``vicuna`` instruction around ``<image>\\n...``), then each phrase's tokens and a
   ``.`` token (referring segmentation), or a generated answer whose phrases are located by character offsets
   (grounded chat). The image: longer side resized to 336 (bicubic), centred on a mean-coloured square, CLIP-normalised.
2. One forward of the frozen LMM. F-LMM asks for every layer's full attention matrix (eager attention); here a
   hook attention (sdpa for the output) computes, per layer, only the softmax rows of the phrase tokens over all
   keys and keeps their image-token columns: ``[heads, rows, image tokens]`` per layer instead of
   ``[heads, seq, seq]``. Hidden states: the last ``num_layers`` entries of transformers' (<= 4.40)
   ``hidden_states``, i.e. the outputs of layers ``0..L-2`` and the final-norm output, at the phrase rows only.
3. Per phrase: its rows averaged, layers x heads stacked as channels (layer-major), reshaped to the patch grid ->
   ``mask_head`` -> coarse logits on the upsampled grid, cropped to the image (the padding removed).
4. SAM refinement: box from the coarse mask (sigmoid, bilinear to the image size, ``> 0.5``, ``[x0, y0, x1+1,
   y1+1]``; the whole image when empty), the coarse logits as the dense mask prompt (bilinear to the resized image,
   padded with ``min(-1, min logit)``, bilinear to ``4 * grid``), ``text_proj(sum_l softmax(w)_l h_l)`` at the
   phrase's tokens as extra sparse tokens after the box's two; one mask (``multimask_output=False``); Meta's
   post-processing; ``logits > 0``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (AttentionInterface, LlavaForConditionalGeneration, PreTrainedModel,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor, SamModel)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .configuration_flmm import FLMMConfig
from .image_utils import module_device_dtype, onloaded, to_rgb
from .sam_image import SamImageHeadMixin

LMM_CLASSES = {"llava": LlavaForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}

# --------------------------------------------------------------------------------------------------------------
# attention rows without the full attention matrix
# --------------------------------------------------------------------------------------------------------------
ROWS_ATTENTION = "maskport_rows_sdpa"
_ACTIVE: dict[str, Any] = {"recorder": None}  # the recorder of the forward in progress (one at a time)


class AttentionRowsRecorder:
    """Collects, per decoder layer, the attention probabilities of the query positions ``rows`` over the key
    positions ``cols`` (``[batch, heads, len(rows), len(cols)]``), computed as transformers' eager attention
    computes them (``q @ k^T * scaling`` in the query dtype, the mask added, softmax in float32, cast back), for
    those rows only."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor):
        self.rows = rows
        self.cols = cols
        self.maps: dict[int, torch.Tensor] = {}

    def record(self, module, query, key, attention_mask, scaling):
        rows, cols = self.rows.to(query.device), self.cols.to(query.device)
        q = query[:, :, rows]                                            # [B, H, r, d]
        groups = query.shape[1] // key.shape[1]
        k = key if groups == 1 else key.repeat_interleave(groups, dim=1)  # transformers' repeat_kv order
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling            # [B, H, r, S]
        if attention_mask is None:  # sdpa's causal shortcut (no padding): key j visible from query i iff j <= i
            keys = torch.arange(k.shape[2], device=q.device)
            offset = k.shape[2] - query.shape[2]
            visible = keys[None, :] <= (rows[:, None] + offset)
            scores = scores.masked_fill(~visible[None, None], torch.finfo(scores.dtype).min)
        elif attention_mask.dtype == torch.bool:
            visible = attention_mask[:, :, rows, : k.shape[2]]
            scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[:, :, rows, : k.shape[2]]
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        self.maps[int(module.layer_idx)] = probs[..., cols]


def rows_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa for the layer's output; while a recorder is active, also the recorder's attention rows."""
    recorder = _ACTIVE["recorder"]
    if recorder is not None and getattr(module, "layer_idx", None) is not None:
        recorder.record(module, query, key, attention_mask,
                        scaling if scaling is not None else query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(ROWS_ATTENTION, rows_sdpa_attention)
AttentionMaskInterface.register(ROWS_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def recording_attention_rows(text_model: nn.Module, recorder: AttentionRowsRecorder):
    """Inside the block, ``text_model``'s attention layers run :func:`rows_sdpa_attention` and fill ``recorder``."""
    if _ACTIVE["recorder"] is not None:
        raise RuntimeError("another attention-row recording is in progress (one grounding forward at a time)")
    config = text_model.config
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = ROWS_ATTENTION
    _ACTIVE["recorder"] = recorder
    try:
        yield recorder
    finally:
        _ACTIVE["recorder"] = None
        config._attn_implementation_internal = previous


@contextlib.contextmanager
def recording_hidden_rows(text_model: nn.Module, rows: torch.Tensor, out: dict):
    """Inside the block, ``out[i]`` = the hidden states at ``rows`` that transformers (<= 4.40) returned as
    ``hidden_states[-L:][i]``: the output of decoder layer ``i`` for ``i < L-1`` and the final norm's output for the
    last one."""
    layers = text_model.layers
    handles = []

    def keep(index):
        def hook(_module, _inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            out[index] = h[:, rows.to(h.device)]
        return hook

    for i, layer in enumerate(layers):
        if i < len(layers) - 1:
            handles.append(layer.register_forward_hook(keep(i)))
    handles.append(text_model.norm.register_forward_hook(keep(len(layers) - 1)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------------
# the mask head: a U-Net on the attention maps
# --------------------------------------------------------------------------------------------------------------
class ConvNormReLU(nn.Module):
    """Conv (no bias) -> GroupNorm -> ReLU (mmcv's ``ConvModule`` with a norm, as mmseg's UNet builds it)."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(groups, cout, eps=eps)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class ConvStack(nn.Module):
    """``n`` 3x3 ``ConvNormReLU`` (mmseg's ``BasicConvBlock`` with stride and dilation 1)."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, eps: float):
        super().__init__()
        self.convs = nn.ModuleList([ConvNormReLU(cin if i == 0 else cout, cout, 3, groups, eps) for i in range(n)])

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        return x


class UpBlock(nn.Module):
    """mmseg's ``UpConvBlock`` with ``InterpConv``: x2 bilinear upsampling (``align_corners=False``, computed in
    float32 to the size ``int(2 * side)``), a 1x1 ``ConvNormReLU`` to the skip's width, concatenation
    ``[skip, x]``, then a ``ConvStack``."""

    def __init__(self, cin: int, skip: int, n: int, groups: int, eps: float):
        super().__init__()
        self.upsample = ConvNormReLU(cin, skip, 1, groups, eps)
        self.block = ConvStack(2 * skip, skip, n, groups, eps)

    def forward(self, skip, x):
        size = [int(t * 2) for t in x.shape[-2:]]
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False).to(x.dtype)
        x = self.upsample(x)
        return self.block(torch.cat([skip, x], dim=1))


class FLMMMaskHead(nn.Module):
    """F-LMM's ``UNetHead``: maps ``[N, C, h, w]`` attention maps to ``[N, h', w']`` mask logits.

    1. ``normalize_input``: each map divided by its sum over the grid (clamped at 1e-12);
    2. ``upsample_input``: bilinear (``align_corners=False``) with ``scale_factor = max(1, upsample_input / max(h, w))``
       in float32;
    3. zero-padded at the bottom/right to a multiple of ``2 ** (num_stages - 1)``;
    4. the U-Net: encoder stage ``i`` = (2x2 max-pool for ``i > 0``) + ``ConvStack``, width ``base * 2**i``; decoder
       from the deepest stage up with ``UpBlock``s; the last decoder output cropped back to the unpadded size;
    5. ``conv_seg``: a 1x1 conv (with bias) to one channel."""

    def __init__(self, settings: dict):
        super().__init__()
        self.settings = dict(settings)
        cin = int(settings["in_channels"])
        base = int(settings["base_channels"])
        stages = int(settings["num_stages"])
        groups, eps = int(settings["norm_groups"]), float(settings["norm_eps"])
        enc, dec = list(settings["enc_num_convs"]), list(settings["dec_num_convs"])
        if len(enc) != stages or len(dec) != stages - 1:
            raise ValueError(f"mask_head: {stages} stages need {stages} enc_num_convs and {stages - 1} dec_num_convs, "
                             f"got {enc} and {dec}")
        self.num_stages = stages
        self.encoder = nn.ModuleList()
        for i in range(stages):
            self.encoder.append(ConvStack(cin if i == 0 else base * 2 ** (i - 1), base * 2 ** i, enc[i], groups, eps))
        self.decoder = nn.ModuleList(
            [UpBlock(base * 2 ** i, base * 2 ** (i - 1), dec[i - 1], groups, eps) for i in range(1, stages)])
        self.conv_seg = nn.Conv2d(base, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.settings.get("normalize_input", True):
            x = x / x.sum((-2, -1), keepdim=True).clamp(min=1e-12)
        up = self.settings.get("upsample_input")
        if up is not None:
            scale = max(1.0, float(up) / max(h, w))
            x = F.interpolate(x.float(), scale_factor=scale, mode="bilinear").to(x.dtype)
            h, w = x.shape[-2:]
        div = 2 ** (self.num_stages - 1)
        ph, pw = math.ceil(h / div) * div, math.ceil(w / div) * div
        x = F.pad(x, (0, pw - w, 0, ph - h))
        skips = []
        for i, stage in enumerate(self.encoder):
            if i > 0:
                x = F.max_pool2d(x, kernel_size=2)
            x = stage(x)
            skips.append(x)
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](skips[i], x)
        return self.conv_seg(x[..., :h, :w])[:, 0]


# --------------------------------------------------------------------------------------------------------------
# helpers (pure functions)
# --------------------------------------------------------------------------------------------------------------
def lmm_image_inputs(image: Image.Image, settings: dict) -> tuple[torch.Tensor, dict]:
    """F-LMM's LLaVA preprocessing: ``([1, 3, S, S] pixel values, meta)`` with ``meta`` = the resized image's
    ``(h, w)``, its offsets ``(top, left)`` in the square and ``S``. The longer side becomes ``S`` (the shorter
    ``int(side * S / longer)``), PIL bicubic on the uint8 image; centred on an ``S x S`` canvas of
    ``int(mean * 255)``; ``/ 255``; ``(x - mean) / std``."""
    size = int(settings["size"])
    rgb = to_rgb(image)
    h, w = rgb.height, rgb.width
    nh, nw = (size, int(w * size / h)) if h > w else (int(h * size / w), size)
    if (nh, nw) != (h, w):
        rgb = rgb.resize((nw, nh), resample=Image.BICUBIC)
    arr = np.asarray(rgb, dtype=np.uint8)
    mean = np.array(settings["image_mean"], dtype=np.float32)
    std = np.array(settings["image_std"], dtype=np.float32)
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[...] = np.array([int(m * 255) for m in settings["image_mean"]], dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = arr
    x = ((canvas.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std  # transformers' rescale, normalize
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous(), {
        "resized": (nh, nw), "offset": (top, left), "padded": (size, size)}


def qwen_image_inputs(image: Image.Image, settings: dict) -> tuple[dict, dict]:
    """Qwen2.5-VL's image inputs (transformers' ``Qwen2VLImageProcessor`` with the settings' pixel bounds):
    ``({pixel_values, image_grid_thw}, meta)``; the merged-token grid is ``grid_h / merge x grid_w / merge`` and
    the image fills it (no padding)."""
    ip = Qwen2VLImageProcessor(min_pixels=int(settings["min_pixels"]), max_pixels=int(settings["max_pixels"]),
                               patch_size=int(settings["patch_size"]),
                               temporal_patch_size=int(settings["temporal_patch_size"]),
                               merge_size=int(settings["merge_size"]), image_mean=list(settings["image_mean"]),
                               image_std=list(settings["image_std"]))
    out = ip(images=[to_rgb(image)], return_tensors="pt")
    _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
    merge, patch = int(settings["merge_size"]), int(settings["patch_size"])
    side = (gh * patch, gw * patch)
    return ({"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]},
            {"resized": side, "offset": (0, 0), "padded": side, "grid": (gh // merge, gw // merge)})


def mask_to_box(mask: torch.Tensor) -> list[float] | None:
    """``[x0, y0, x1 + 1, y1 + 1]`` of a boolean ``[H, W]`` mask's pixels, ``None`` when it is empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


STOP_PHRASES = {"it", "this", "that", "those", "these", "them", "he", "she", "you", "i", "they", "me", "her", "him",
                "a", "what", "which", "whose", "who"}


def select_noun_phrases(chunks: list[str], text: str) -> list[str]:
    """F-LMM's grounded-chat filter of noun chunks: drop chunks naming the image and pronoun-like ones, drop a chunk
    contained in another (the longer, or the earlier, wins), order by first position in ``text``, drop overlaps."""
    chunks = list(dict.fromkeys(chunks))
    kept = []
    for i, c in enumerate(chunks):
        if "image" in c.lower() or c.lower() in STOP_PHRASES:
            continue
        if any(i != j and c in o and (len(c) < len(o) or i > j) for j, o in enumerate(chunks)):
            continue
        kept.append(c)
    kept.sort(key=text.find)
    out, last = [], 0
    for c in kept:
        start = text.find(c)
        if start >= last:
            out.append(c)
            last = start + len(c)
    return out


NEEDS_NLP = ("grounding an answer's noun phrases needs a noun-chunk parser, as F-LMM's demo uses spaCy: "
             "pip install spacy && python -m spacy download en_core_web_sm, then pass "
             "nlp=spacy.load('en_core_web_sm') to predict_forward (or pass phrases=[...] to ground given phrases)")


def noun_phrases(text: str, nlp=None) -> list[str]:
    """Noun phrases of ``text``: ``nlp`` (spaCy's ``en_core_web_sm``, or any callable whose result has spaCy's
    ``noun_chunks``) parses it, :func:`select_noun_phrases` filters the chunks. spaCy is not imported here (the
    export's code depends on torch, transformers, numpy and PIL only): the caller loads it."""
    if nlp is None:
        raise ValueError(NEEDS_NLP)
    chunks = [c.text for c in nlp(text).noun_chunks]
    return select_noun_phrases(chunks, text) if chunks else [text]


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------
class FLMMModel(SamImageHeadMixin, PreTrainedModel):
    """F-LMM: ``ground`` (referring segmentation, no generation) and ``predict_forward`` (answer, then ground the
    answer's noun phrases)."""

    config_class = FLMMConfig
    base_model_prefix = "flmm"
    main_input_name = "input_ids"
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "SamModel"]
    _supports_sdpa = True
    _supports_attention_backend = True
    supports_gradient_checkpointing = False
    _checkpoint_conversion_mapping: dict = {}

    def __init__(self, config: FLMMConfig):
        super().__init__(config)
        lmm_type = config.lmm_config.model_type
        if lmm_type not in LMM_CLASSES:
            raise ValueError(f"unsupported base LMM {lmm_type!r}; supported: {sorted(LMM_CLASSES)}")
        self.mllm = LMM_CLASSES[lmm_type](config.lmm_config)
        self.sam = SamModel(config.sam_config)
        text = config.lmm_config.get_text_config()
        settings = dict(config.mask_head)
        channels = text.num_hidden_layers * text.num_attention_heads
        if settings.get("in_channels") is None:
            settings["in_channels"] = channels
        if int(settings["in_channels"]) != channels:
            raise ValueError(f"mask_head.in_channels={settings['in_channels']} but the LMM has "
                             f"{text.num_hidden_layers} layers x {text.num_attention_heads} heads = {channels}")
        self.mask_head = FLMMMaskHead(settings)
        self.text_layer_weights = nn.Parameter(torch.ones(text.num_hidden_layers))
        self.text_proj = nn.Linear(text.hidden_size, config.text_proj_dim)
        self.post_init()
        self._weight_conversions = []

    # ---- plumbing ----------------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.mllm.get_input_embeddings()

    def forward(self, *args, **kwargs):
        raise NotImplementedError("use ground(image=, phrases=[...], tokenizer=) or predict_forward(image=, text=, "
                                  "tokenizer=)")

    @property
    def text_model(self) -> nn.Module:
        return self.mllm.model.language_model

    def image_inputs(self, image: Image.Image) -> tuple[dict, dict]:
        """``(LMM image kwargs, meta)``; meta: the merged-token ``grid`` (rows, cols), the ``resized`` image's size
        inside the ``padded`` LMM input and its ``offset`` there."""
        cfg = self.config.lmm_config
        if cfg.model_type == "qwen2_5_vl":
            return qwen_image_inputs(image, self.config.image_processor)
        if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
            raise ValueError("only LLaVA's 'default' vision feature selection (no CLS token) maps to a patch grid")
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        if int(self.config.image_processor["size"]) != cfg.vision_config.image_size:
            raise ValueError("image_processor.size must equal the vision tower's image_size")
        pixel_values, meta = lmm_image_inputs(image, self.config.image_processor)
        meta["grid"] = (side, side)
        return {"pixel_values": pixel_values}, meta

    def _prompt_ids(self, tokenizer, user_input: str, n_image_tokens: int) -> list[int]:
        """The instruction with ``user_input``, tokenized with special tokens (BOS where the tokenizer adds one), the
        single image placeholder expanded to the image's ``n_image_tokens`` tokens."""
        tpl = self.config.template
        ids = tokenizer.encode(tpl["instruction"].replace("{input}", user_input), add_special_tokens=True)
        image_id = self.config.lmm_config.image_token_id
        at = [i for i, t in enumerate(ids) if t == image_id]
        if len(at) != 1:
            raise ValueError(f"the prompt must hold exactly one image placeholder {tpl['image_placeholder']!r} "
                             f"(id {image_id}), found {len(at)}")
        return ids[:at[0]] + [image_id] * int(n_image_tokens) + ids[at[0] + 1:]

    # ---- the grounding forward ---------------------------------------------------------------------------------
    @torch.no_grad()
    def phrase_features(self, mm: dict, grid: tuple[int, int], input_ids: list[int], phrase_rows: list[list[int]]):
        """One LMM forward over ``input_ids`` with the image inputs ``mm``; per phrase (its token positions
        ``phrase_rows[p]``): the attention maps ``[layers * heads, gh, gw]`` (rows averaged) and the layer-weighted
        hidden states ``[n_p, hidden]``."""
        if not phrase_rows or any(len(r) == 0 for r in phrase_rows):
            raise ValueError("every phrase needs at least one token")
        device, dtype = module_device_dtype(self.mllm)
        ids = torch.tensor([input_ids], dtype=torch.long, device=device)
        image_id = self.config.lmm_config.image_token_id
        cols = torch.nonzero(ids[0] == image_id, as_tuple=True)[0]
        gh, gw = grid
        if cols.numel() != gh * gw:
            raise ValueError(f"{cols.numel()} image tokens, expected {gh * gw}")
        all_rows = sorted({r for rows in phrase_rows for r in rows})
        rows = torch.tensor(all_rows, dtype=torch.long, device=device)
        index = {r: i for i, r in enumerate(all_rows)}
        recorder = AttentionRowsRecorder(rows, cols)
        hidden: dict[int, torch.Tensor] = {}
        with recording_attention_rows(self.text_model, recorder), recording_hidden_rows(self.text_model, rows, hidden):
            self.mllm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                            **self._to_device(mm, device, dtype))
        n_layers = len(self.text_model.layers)
        if len(recorder.maps) != n_layers or len(hidden) != n_layers:
            raise RuntimeError(f"recorded {len(recorder.maps)} attention layers and {len(hidden)} hidden states, "
                               f"expected {n_layers}: the LMM's attention did not run through the recorder")
        maps = torch.stack([recorder.maps[i][0] for i in range(n_layers)])            # [L, H, r, n_img]
        states = torch.stack([hidden[i][0] for i in range(n_layers)])                 # [L, r, C]
        weights = torch.softmax(self.text_layer_weights, dim=0).to(states.dtype)
        states = (states * weights.view(-1, 1, 1)).sum(0)                              # [r, C]
        attn, embeds = [], []
        for pr in phrase_rows:
            sel = torch.tensor([index[r] for r in pr], device=maps.device)
            m = maps[:, :, sel]
            m = m.mean(dim=2) if self.config.mask_head.get("merge", "mean") == "mean" else m.max(dim=2).values
            attn.append(m.reshape(-1, gh, gw))                                         # layer-major channels
            embeds.append(states[sel])
        return attn, embeds

    @staticmethod
    def _to_device(mm: dict, device, dtype) -> dict:
        return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in mm.items()}

    def coarse_masks(self, attn: list[torch.Tensor], meta: dict) -> torch.Tensor:
        """Mask-head logits ``[P, h, w]`` for the phrases' attention maps, cropped to the resized image (F-LMM's
        unpadding: offsets ``int(offset * h' / H)``, sizes ``int(side * h' / H + 0.5)``, ``H`` the padded input's
        side, per axis)."""
        _, dtype = module_device_dtype(self.mask_head)
        logits = self.mask_head(torch.stack(attn).to(dtype))
        ph, pw = logits.shape[-2:]
        sh, sw = meta["padded"]
        top, left = int(meta["offset"][0] * ph / sh), int(meta["offset"][1] * pw / sw)
        h = int(meta["resized"][0] * ph / sh + 0.5)
        w = int(meta["resized"][1] * pw / sw + 0.5)
        return logits[:, top:top + h, left:left + w].contiguous()

    @torch.no_grad()
    def refine(self, image: Image.Image, coarse: torch.Tensor, text_embeds: list[torch.Tensor]) -> torch.Tensor:
        """SAM refinement (F-LMM's ``SAMWrapper.forward`` with box, mask and text prompts, one mask each): logits
        ``[P, H, W]`` at the image's size."""
        sam = self.sam
        device, dtype = module_device_dtype(sam)
        pixel_values, input_size = self.sam_preprocess(image)
        original = (image.height, image.width)
        size = int(self.config.sam_image_size)
        grid = sam.prompt_encoder.image_embedding_size
        mask_side = 4 * grid[0]
        with onloaded(sam):
            embeddings = sam.get_image_embeddings(pixel_values)
            pe = sam.get_image_wide_positional_embeddings()
            pad_value = min(-1.0, float(coarse.min()))
            prompts = F.interpolate(coarse[:, None].float(), size=input_size, mode="bilinear").to(coarse.dtype)
            prompts = F.pad(prompts, (0, size - input_size[1], 0, size - input_size[0]), value=pad_value)
            prompts = F.interpolate(prompts.float(), size=(mask_side, mask_side), mode="bilinear").to(coarse.dtype)
            binary = F.interpolate(coarse[None].float().sigmoid(), size=original, mode="bilinear")[0] > 0.5
            out = []
            for p in range(coarse.shape[0]):
                box = mask_to_box(binary[p]) or [0.0, 0.0, float(original[1]), float(original[0])]
                sx, sy = input_size[1] / original[1], input_size[0] / original[0]
                box = torch.tensor([[[box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]]], dtype=torch.float32,
                                   device=device)
                sparse, dense = sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=box,
                                                   input_masks=prompts[p:p + 1].to(device=device, dtype=dtype))
                text = text_embeds[p][None, None].to(device=device, dtype=dense.dtype)
                sparse = torch.cat([sparse.to(dense.dtype), text], dim=2)
                low, _ = sam.mask_decoder(image_embeddings=embeddings, image_positional_embeddings=pe,
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
                out.append(self.sam_postprocess(low[0, 0, :1].float(), input_size, original)[0])
        return torch.stack(out)

    def _ground(self, image, mm: dict, meta: dict, prompt_ids: list[int], body_ids: list[int],
                phrase_rows: list[list[int]], return_coarse: bool, mask_threshold: float | None = None,
                return_probabilities: bool = False) -> dict[str, Any]:
        start = len(prompt_ids)
        attn, embeds = self.phrase_features(mm, meta["grid"], prompt_ids + body_ids,
                                            [[start + r for r in rows] for rows in phrase_rows])
        coarse = self.coarse_masks(attn, meta)
        text_embeds = [self.text_proj(e.to(self.text_proj.weight.dtype)) for e in embeds]
        logits = self.refine(image, coarse, text_embeds)
        thr = float(self.config.mask_threshold if mask_threshold is None else mask_threshold)
        masks = [((x > 0) if thr == 0.5 else (x.sigmoid() > thr))[None].cpu().numpy() for x in logits]
        out: dict[str, Any] = {"prediction_masks": masks}
        if return_probabilities:
            out["prediction_probabilities"] = [x.sigmoid()[None].cpu().numpy().astype(np.float32) for x in logits]
        if return_coarse:
            out["coarse_logits"] = coarse.float().cpu()
            out["sam_logits"] = logits.cpu()
        return out

    @torch.no_grad()
    def ground(self, image: Image.Image, phrases: list[str], tokenizer, text: str | None = None,
               question: str | None = None, return_coarse: bool = False, mask_threshold: float | None = None,
               return_probabilities: bool = False) -> dict[str, Any]:
        """One mask per phrase, without generation.

        ``text=None`` (referring segmentation, F-LMM's RefCOCO input): after the prompt (``template.ground_input``,
        or ``question``), each phrase's tokens followed by the separator token. ``text`` given: ``text`` follows the
        prompt and each phrase is located in it (left to right, by character offsets; a fast tokenizer is needed)
        and grounded by its tokens.

        Returns ``{"phrases", "prediction_masks": [bool (1, H, W)] per phrase}`` (+ ``coarse_logits``,
        ``sam_logits`` with ``return_coarse``)."""
        phrases = [str(p) for p in phrases]
        if not phrases or any(not p.strip() for p in phrases):
            raise ValueError("phrases must be a non-empty list of non-empty strings")
        tpl = self.config.template
        user = question if question is not None else tpl["ground_input"]
        if question is not None and tpl["image_placeholder"] not in user:
            user = tpl["chat_input"].replace("{text}", user)
        image = to_rgb(image)
        mm, meta = self.image_inputs(image)
        prompt_ids = self._prompt_ids(tokenizer, user, meta["grid"][0] * meta["grid"][1])
        if text is None:
            sep = tokenizer.encode(tpl["phrase_separator"], add_special_tokens=False)[-1]
            body, rows = [], []
            for p in phrases:
                ids = tokenizer.encode(p, add_special_tokens=False)
                rows.append(list(range(len(body), len(body) + len(ids))))
                body += ids + [sep]
        else:
            body, rows = self._locate(tokenizer, text, phrases)
        out = self._ground(image, mm, meta, prompt_ids, body, rows, return_coarse, mask_threshold,
                           return_probabilities)
        out["phrases"] = phrases
        return out

    @staticmethod
    def _locate(tokenizer, text: str, phrases: list[str]) -> tuple[list[int], list[list[int]]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        rows, last = [], 0
        for p in phrases:
            start = text.find(p, last)
            if start < 0:
                raise ValueError(f"phrase {p!r} does not occur in the text (after position {last})")
            end = start + len(p)
            last = end
            toks = [i for i, (a, b) in enumerate(offsets) if b > start and a < end]
            if not toks:
                raise ValueError(f"phrase {p!r} covers no token")
            rows.append(toks)
        return ids, rows

    @torch.no_grad()
    def predict_forward(self, image: Image.Image, text: str, tokenizer, phrases: list[str] | None = None,
                        max_new_tokens: int | None = None, nlp=None, return_coarse: bool = False,
                        mask_threshold: float | None = None, return_probabilities: bool = False,
                        generation_kwargs: dict | None = None) -> dict[str, Any]:
        """Answer ``text`` about ``image`` (greedy unless ``generation_kwargs`` say otherwise), then ground the
        answer's noun phrases in one more forward over prompt + answer: those ``nlp`` finds (e.g.
        ``spacy.load("en_core_web_sm")``, as F-LMM's demo; any callable whose result has spaCy's ``noun_chunks``),
        or the given ``phrases``. With neither, a ``ValueError`` says how to get spaCy. Returns
        ``{"prediction", "phrases", "prediction_masks"}`` (+ ``prediction_probabilities``).

        ``text`` starting with ``template.ground_prefix`` (``"ground: "``): the rest is one referring expression,
        grounded without generation (:meth:`ground`); ``prediction`` is the expression."""
        image = to_rgb(image)
        tpl = self.config.template
        prefix = tpl.get("ground_prefix")
        if prefix and text.startswith(prefix):
            expression = text[len(prefix):].strip()
            out = self.ground(image, [expression], tokenizer, return_coarse=return_coarse,
                              mask_threshold=mask_threshold, return_probabilities=return_probabilities)
            out["prediction"] = expression
            return out
        user = text if tpl["image_placeholder"] in text else tpl["chat_input"].replace("{text}", text)
        mm, meta = self.image_inputs(image)
        prompt_ids = self._prompt_ids(tokenizer, user, meta["grid"][0] * meta["grid"][1])
        device, dtype = module_device_dtype(self.mllm)
        ids = torch.tensor([prompt_ids], device=device)
        stop = [tokenizer.convert_tokens_to_ids(w) for w in tpl.get("stop_words", [])]
        stop = [s for s in stop if isinstance(s, int) and s != tokenizer.unk_token_id]
        out = self.mllm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                **self._to_device(mm, device, dtype),
                                **{"max_new_tokens": int(max_new_tokens or self.config.max_new_tokens),
                                   "do_sample": False, "eos_token_id": stop or None,
                                   "pad_token_id": tokenizer.pad_token_id, **dict(generation_kwargs or {})})
        new = out[0, len(prompt_ids):].tolist()
        while new and new[-1] in stop:
            new = new[:-1]
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        if phrases is None:
            if nlp is None:
                raise ValueError(NEEDS_NLP)
            phrases = noun_phrases(answer, nlp) if answer else []
        result: dict[str, Any] = {"prediction": answer, "phrases": list(phrases), "prediction_masks": []}
        if phrases:
            body, rows = self._locate(tokenizer, answer, list(phrases))
            result.update(self._ground(image, mm, meta, prompt_ids, body, rows, return_coarse, mask_threshold,
                                       return_probabilities))
        elif return_probabilities:
            result["prediction_probabilities"] = []
        return result


__all__ = ["FLMMModel", "FLMMMaskHead", "AttentionRowsRecorder", "lmm_image_inputs", "mask_to_box", "noun_phrases",
           "select_noun_phrases", "recording_attention_rows", "recording_hidden_rows"]
