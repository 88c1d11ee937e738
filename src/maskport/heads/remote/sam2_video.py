"""SAM2 video head of maskport exports: transformers' ``Sam2VideoModel`` (the export's ``self.sam2``), the language
prompt on key frames and the propagation of each prompt's mask through all frames, streamed one frame at a time.

Copied verbatim into every export folder whose family uses it (``FamilySpec.heads``), next to the family's
``modeling_*.py``. It may import only torch, numpy, PIL and its siblings.

How a video is segmented (what Sa2VA's released code runs through Meta's ``SAM2VideoPredictor``, with its
``add_language_embd`` extension):

1. Key frames (``official``: the first 5; ``uniform``: N spread over the video) get the ``[SEG]`` embedding as a
   prompt: image features -> + ``no_memory_embedding`` (no memory on an initial conditioning frame) -> the SAM heads
   with the sparse prompt ``[padding point, language embedding]`` (as the image path) -> mask logits, object
   pointer; the memory encoder then encodes the frame's features with the predicted mask (sigmoid, x20 - 10:
   ``sigmoid_scale/bias_for_mem_enc``) into the frame's memory. All key frames are done before any other frame,
   like ``propagate_in_video_preflight``.
2. The other frames, in order: the frame's top-level features cross-attend (memory attention) to the memories of
   every key frame (temporal encoding slot ``num_maskmem - 1``) and of the ``num_maskmem - 1`` frames just before it
   (slot ``k - 1`` for ``k`` frames back), plus the object pointers of the key frames before it and of up to
   ``max_object_pointers_in_encoder - 1`` frames before it; then the SAM heads with no prompt (two padding tokens),
   best-of-3 masks (``multimask_output_for_tracking``), and the memory encoder on the result.

Only what later frames can read is kept: key-frame memories and the last ``max(num_maskmem,
max_object_pointers_in_encoder) - 1`` frames' memories/pointers; frames are read, used and dropped, so memory does
not grow with the video's length (the answer's ``(T, H, W)`` bool masks aside).

``object_score_gating``: Meta's SAM2 sets the mask of a frame whose object score is <= 0 to -1024 and replaces its
object pointer by ``no_object_pointer``; Sa2VA's modified SAM2 has the mask gating commented out (the image path
measured so), and the exports default to no gating (``config.sam2_video_object_score_gating = False``): pass
``True`` for Meta's behaviour.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (Sam2VideoConfig, Sam2VideoMaskDecoderConfig, Sam2VideoModel,
                          Sam2VideoPromptEncoderConfig)

from .image_utils import onloaded, to_rgb

NO_OBJ_SCORE = -1024.0
_STOCK_KV_DIM = 64  # transformers' Sam2VideoMemoryAttentionLayer builds cross_attn_image with kv_in_dim=64


def sam2_video_config(value) -> Sam2VideoConfig:
    """A ``Sam2VideoConfig`` from a config object or its dict (``config.json``). transformers 5's
    ``Sam2VideoConfig(mask_decoder_config=dict)`` builds a prompt-encoder config from that dict, so the
    sub-configurations are built here with their own classes."""
    if isinstance(value, Sam2VideoConfig):
        return value
    if value is None:
        return Sam2VideoConfig()
    if not isinstance(value, dict):
        raise TypeError(f"sam2_config must be a Sam2VideoConfig or its dict, got {type(value).__name__}")
    data = copy.deepcopy(value)
    if data.get("model_type") not in (None, "sam2_video"):
        raise ValueError(f"sam2_config has model_type {data.get('model_type')!r}; this export's code expects "
                         "'sam2_video' (transformers' Sam2VideoModel)")
    if isinstance(data.get("prompt_encoder_config"), dict):
        data["prompt_encoder_config"] = Sam2VideoPromptEncoderConfig(**data["prompt_encoder_config"])
    if isinstance(data.get("mask_decoder_config"), dict):
        data["mask_decoder_config"] = Sam2VideoMaskDecoderConfig(**data["mask_decoder_config"])
    return Sam2VideoConfig(**data)


def build_sam2_video(config: Sam2VideoConfig) -> Sam2VideoModel:
    """``Sam2VideoModel(config)``; when the memory is not 64 channels wide (every official SAM2's is), the memory
    cross-attention's key/value projections, which transformers builds 64 wide whatever the config, are rebuilt
    ``memory_encoder_output_channels`` wide (same module, same parameter names)."""
    model = Sam2VideoModel(config)
    mem_dim = int(config.memory_encoder_output_channels)
    if mem_dim != _STOCK_KV_DIM:
        for layer in model.memory_attention.layers:
            attn_cls = type(layer.cross_attn_image)
            layer.cross_attn_image = attn_cls(config, kv_in_dim=mem_dim, rope_k_repeat=True)
    return model


class _Memory:
    """One object's memory bank: key-frame outputs (kept) and recent frames' outputs (pruned)."""

    def __init__(self, keep: int):
        self.cond: dict[int, dict[str, torch.Tensor]] = {}
        self.recent: dict[int, dict[str, torch.Tensor]] = {}
        self.keep = keep

    def add_recent(self, frame_idx: int, out: dict[str, torch.Tensor]):
        self.recent[frame_idx] = out
        for t in [t for t in self.recent if t <= frame_idx - self.keep]:
            del self.recent[t]


class Sam2VideoTracker:
    """Language-prompted SAM2 video segmentation over transformers' ``Sam2VideoModel`` pieces (see the module
    docstring). One instance per video; objects are tracked independently (as Sa2VA runs one SAM2 state per
    ``[SEG]``), sharing each frame's image features.

    Args:
        sam: the ``Sam2VideoModel``.
        num_frames: frames in the video (Meta's predictor knows it: it caps the object pointers at
            ``min(num_frames, max_object_pointers_in_encoder)``, which also scales their temporal encoding).
        object_score_gating: Meta's gating of masks and object pointers by the object score (see module docstring).
        binarize_prompt_masks: encode key-frame masks as ``logits > 0`` instead of their sigmoid (Meta's
            ``binarize_mask_from_pts_for_mem_enc``; off in Sa2VA and in Meta's default model config).
    """

    def __init__(self, sam: Sam2VideoModel, num_frames: int, *, object_score_gating: bool = False,
                 binarize_prompt_masks: bool = False):
        self.sam = sam
        self.cfg = sam.config
        self.num_frames = int(num_frames)
        self.gating = bool(object_score_gating)
        self.binarize_prompt_masks = bool(binarize_prompt_masks)
        self.max_ptrs = min(self.num_frames, int(self.cfg.max_object_pointers_in_encoder))
        self.memories: list[_Memory] = []
        keep = max(int(self.cfg.num_maskmem), self.max_ptrs, 1)
        self._keep = keep

    # ---- pieces ------------------------------------------------------------------------------------------
    def frame_features(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        """Image features of one frame ``[1, 3, S, S]``: flattened ``(HW, 1, C)`` levels (``conv_s0``/``conv_s1``
        applied to the two high-resolution ones) and their position encodings."""
        out = self.sam.get_image_features(pixel_values, return_dict=True)
        return {"feats": list(out.fpn_hidden_states), "pos": list(out.fpn_position_encoding)}

    def _maps(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = self.sam.backbone_feature_sizes
        return [x.permute(1, 2, 0).reshape(x.shape[1], x.shape[2], *s) for x, s in zip(feats, sizes)]

    def _sam_heads(self, pix_feat: torch.Tensor, high_res: list[torch.Tensor], language: torch.Tensor | None,
                   multimask: bool) -> dict[str, torch.Tensor]:
        """``SAM2Base._forward_sam_heads`` with no points (one padding point, label -1, plus the prompt encoder's
        own pad) and the optional language embedding ``[1, D]`` appended to the sparse tokens."""
        sam = self.sam
        device, dtype = pix_feat.device, pix_feat.dtype
        points = torch.zeros((1, 1, 1, 2), dtype=dtype, device=device)
        labels = -torch.ones((1, 1, 1), dtype=torch.int32, device=device)
        sparse, dense = sam.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                           input_masks=None)
        if language is not None:
            sparse = torch.cat([sparse, language.to(device=device, dtype=sparse.dtype).reshape(1, 1, 1, -1)], dim=2)
        image_pe = sam.get_image_wide_positional_embeddings()
        masks, ious, tokens, obj_scores = sam.mask_decoder(
            image_embeddings=pix_feat, image_positional_embeddings=image_pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask, high_resolution_features=high_res)
        # masks [1, 1, M, h, w], ious [1, 1, M], tokens [1, 1, M, C], obj_scores [1, 1, 1]
        obj_scores = obj_scores.reshape(1, 1)
        appearing = obj_scores > 0
        if self.gating:
            masks = torch.where(appearing[:, :, None, None, None], masks, NO_OBJ_SCORE)
        if masks.shape[2] > 1:
            best = int(ious[0, 0].argmax())
            low = masks[:, 0, best:best + 1]
            token = tokens[:, 0, best]
        else:
            low = masks[:, 0, 0:1]
            token = tokens[:, 0, 0]
        low = low.float()
        size = self.cfg.image_size
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        high = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        pointer = sam.object_pointer_proj(token)
        if self.gating:
            lam = appearing.to(pointer.dtype)
            pointer = lam * pointer + (1 - lam) * sam.no_object_pointer
        return {"low": low, "high": high, "pointer": pointer, "object_score": obj_scores}

    def _encode_memory(self, top: torch.Tensor, high: torch.Tensor, object_score: torch.Tensor,
                       binarize: bool) -> dict[str, torch.Tensor]:
        """``SAM2Base._encode_new_memory`` on the frame's raw top-level features ``(HW, 1, C)``; the features are
        stored in bfloat16 as Meta's predictor (and transformers) store them."""
        sam = self.sam
        pix = top.permute(1, 2, 0).reshape(top.shape[1], top.shape[2], *sam.backbone_feature_sizes[-1])
        mask = (high > 0).to(high.dtype) if binarize else torch.sigmoid(high)
        mask = mask * float(self.cfg.sigmoid_scale_for_mem_enc) + float(self.cfg.sigmoid_bias_for_mem_enc)
        feats, pos = sam.memory_encoder(pix, mask.to(pix.dtype))
        if sam.occlusion_spatial_embedding_parameter is not None:
            absent = 1 - (object_score > 0).to(feats.dtype)
            feats = feats + absent[..., None, None] * sam.occlusion_spatial_embedding_parameter[..., None, None]
        return {"maskmem": feats.to(torch.bfloat16).flatten(2).permute(2, 0, 1),
                "maskmem_pos": pos.to(top.dtype).flatten(2).permute(2, 0, 1)}

    def _conditioned(self, frame_idx: int, memory: _Memory, feats: dict) -> torch.Tensor:
        """``SAM2Base._prepare_memory_conditioned_features`` for a tracked frame: ``[1, C, H, W]``."""
        sam, cfg = self.sam, self.cfg
        top, top_pos = feats["feats"][-1], feats["pos"][-1]
        device = top.device
        cond = memory.cond
        max_cond = int(cfg.max_cond_frame_num)
        if max_cond == -1 or len(cond) <= max_cond:
            selected, unselected = cond, {}
        else:
            selected, unselected = sam._select_closest_cond_frames(frame_idx, cond, max_cond)
        mems, poss = [], []
        num_maskmem = int(cfg.num_maskmem)
        tpos = sam.memory_temporal_positional_encoding
        for out in selected.values():
            mems.append(out["maskmem"].to(device))
            poss.append(out["maskmem_pos"] + tpos[num_maskmem - 1])
        for back in range(num_maskmem - 1, 0, -1):
            out = memory.recent.get(frame_idx - back, unselected.get(frame_idx - back))
            if out is None:
                continue
            mems.append(out["maskmem"].to(device))
            poss.append(out["maskmem_pos"] + tpos[back - 1])
        offsets, pointers = [], []
        for t, out in selected.items():
            if t <= frame_idx:
                offsets.append(frame_idx - t)
                pointers.append(out["pointer"])
        for back in range(1, self.max_ptrs):
            t = frame_idx - back
            if t < 0:
                break
            out = memory.recent.get(t, unselected.get(t))
            if out is not None:
                offsets.append(back)
                pointers.append(out["pointer"])
        n_ptr_tokens = 0
        if pointers:
            ptrs, ptr_pos = sam._process_object_pointers(offsets, pointers, self.max_ptrs, 1, sam.hidden_dim, device)
            mems.append(ptrs)
            poss.append(ptr_pos)
            n_ptr_tokens = ptrs.shape[0]
        memory_tokens = torch.cat(mems, dim=0).to(top.dtype)
        memory_pos = torch.cat(poss, dim=0).to(top.dtype)
        out = sam.memory_attention(current_vision_features=top, current_vision_position_embeddings=top_pos,
                                   memory=memory_tokens, memory_posision_embeddings=memory_pos,
                                   num_object_pointer_tokens=n_ptr_tokens)
        h, w = sam.backbone_feature_sizes[-1]
        return out.squeeze(1).transpose(1, 2).reshape(1, sam.hidden_dim, h, w)

    def _multimask(self, prompted: bool) -> bool:
        # _use_multimask with no points: 0 points must lie within [multimask_min_pt_num, multimask_max_pt_num]
        cfg = self.cfg
        return bool(cfg.multimask_output_in_sam and (prompted or cfg.multimask_output_for_tracking)
                    and cfg.multimask_min_pt_num <= 0 <= cfg.multimask_max_pt_num)

    # ---- the two phases ------------------------------------------------------------------------------------
    def add_key_frame(self, frame_idx: int, feats: dict, language_embeddings: torch.Tensor) -> torch.Tensor:
        """Prompt every object on a key frame (``language_embeddings`` ``[N, D]``, one row per object; the first
        key frame fixes ``N``). Returns the low-resolution logits ``[N, 1, h, w]``."""
        if not self.memories:
            self.memories = [_Memory(self._keep) for _ in range(language_embeddings.shape[0])]
        if language_embeddings.shape[0] != len(self.memories):
            raise ValueError(f"{language_embeddings.shape[0]} prompts on frame {frame_idx}, "
                             f"{len(self.memories)} objects before")
        maps = self._maps(feats["feats"])
        top = feats["feats"][-1]
        pix = (top + self.sam.no_memory_embedding).permute(1, 2, 0).reshape(maps[-1].shape)
        lows = []
        for obj, memory in enumerate(self.memories):
            out = self._sam_heads(pix, maps[:-1], language_embeddings[obj:obj + 1], self._multimask(True))
            mem = self._encode_memory(top, out["high"], out["object_score"], self.binarize_prompt_masks)
            memory.cond[frame_idx] = {"pointer": out["pointer"], "low": out["low"], **mem}
            lows.append(out["low"])
        return torch.cat(lows, dim=0)

    def key_frame_logits(self, frame_idx: int) -> torch.Tensor | None:
        if self.memories and frame_idx in self.memories[0].cond:
            return torch.cat([m.cond[frame_idx]["low"] for m in self.memories], dim=0)
        return None

    def track(self, frame_idx: int, feats: dict) -> torch.Tensor:
        """One frame that is not a key frame: ``[N, 1, h, w]`` low-resolution logits; the frame's memory and
        pointer join the bank."""
        maps = self._maps(feats["feats"])
        top = feats["feats"][-1]
        lows = []
        for memory in self.memories:
            pix = self._conditioned(frame_idx, memory, feats)
            out = self._sam_heads(pix, maps[:-1], None, self._multimask(False))
            mem = self._encode_memory(top, out["high"], out["object_score"], False)
            memory.add_recent(frame_idx, {"pointer": out["pointer"], **mem})
            lows.append(out["low"])
        return torch.cat(lows, dim=0)


# ----------------------------------------------------------------------------------------------------------------
# video input: a list of frames, a folder of frame images, or a video file (PyAV, imported only then)
# ----------------------------------------------------------------------------------------------------------------
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _natural_key(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def _frame(value, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[2] in (3, 4) and value.dtype == np.uint8:
        return to_rgb(Image.fromarray(value))
    raise TypeError(f"{where}: a frame must be a PIL.Image or an HxWx3 uint8 array, got {type(value).__name__}")


class VideoFrames:
    """The frames of a video, read in order and as often as needed without holding them all: ``len()``, ``iter()``
    (PIL RGB frames) and :meth:`take` (some frames by index, one pass).

    ``video``: a list/tuple of PIL images or HxWx3 uint8 arrays (or one ``(T, H, W, 3)`` uint8 array); a folder
    of frame images (``.jpg``/``.png``/...; sorted by name with numbers compared as numbers: ``2.jpg`` before
    ``10.jpg``); or a video file, decoded with PyAV (``pip install av``; imported only for files)."""

    def __init__(self, video):
        self._items = None
        self._files = None
        self._path = None
        if isinstance(video, np.ndarray) and video.ndim == 4:
            video = list(video)
        if isinstance(video, (list, tuple)):
            self._items = list(video)
            self.source = f"a list of {len(self._items)} frames"
        elif isinstance(video, (str, os.PathLike)):
            path = Path(video)
            if path.is_dir():
                files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
                self._files = sorted(files, key=lambda p: _natural_key(p.name))
                self.source = f"frame folder {path} ({len(self._files)} frames)"
            elif path.is_file():
                self._path = path
                self._count = sum(1 for _ in self._decode(to_image=False))
                self.source = f"video file {path.name} ({self._count} frames)"
            else:
                raise FileNotFoundError(f"video {path} is neither a frame folder nor a file")
        else:
            raise TypeError("video must be a list of frames (PIL images or HxWx3 uint8 arrays), a folder of frame "
                            f"images or a video file path, got {type(video).__name__}")
        if len(self) == 0:
            raise ValueError(f"the video has no frames ({self.source})")

    def _decode(self, to_image: bool = True) -> Iterator:
        try:
            import av
        except ImportError:
            raise ImportError("reading a video file needs PyAV (pip install av); or pass the frames as a list or a "
                              "folder of frame images") from None
        with av.open(str(self._path)) as container:
            if not container.streams.video:
                raise ValueError(f"{self._path.name} has no video stream")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                yield frame.to_image().convert("RGB") if to_image else None

    def __len__(self) -> int:
        if self._items is not None:
            return len(self._items)
        if self._files is not None:
            return len(self._files)
        return self._count

    def __iter__(self) -> Iterator[Image.Image]:
        if self._items is not None:
            for i, item in enumerate(self._items):
                yield _frame(item, f"frame {i}")
        elif self._files is not None:
            for f in self._files:
                with Image.open(f) as im:
                    yield to_rgb(im).copy() if im.mode == "RGB" else to_rgb(im)
        else:
            yield from self._decode()

    def take(self, indices: Iterable[int]) -> dict[int, Image.Image]:
        """``{index: frame}`` for the given indices (one pass over the video)."""
        want = set(int(i) for i in indices)
        out: dict[int, Image.Image] = {}
        if self._items is not None or self._files is not None:
            for i in sorted(want):
                if self._items is not None:
                    out[i] = _frame(self._items[i], f"frame {i}")
                else:
                    with Image.open(self._files[i]) as im:
                        out[i] = to_rgb(im).copy() if im.mode == "RGB" else to_rgb(im)
            return out
        for i, frame in enumerate(self):
            if i in want:
                out[i] = frame
            if len(out) == len(want):
                break
        return out


def key_frame_indices(num_frames: int, mode: str = "official", num_key_frames: int | None = None) -> list[int]:
    """Which frames go through the LLM and prompt SAM2: ``official`` = the first ``min(5, T)`` (Sa2VA's released
    code), ``uniform`` = ``num_key_frames`` (default 5) spread evenly from the first to the last frame."""
    if num_frames < 1:
        raise ValueError("the video has no frames")
    if mode == "official":
        if num_key_frames not in (None, 5):
            raise ValueError("key_frames='official' always uses the first 5 frames (Sa2VA's code); use "
                             "key_frames='uniform' with num_key_frames=N for another count")
        return list(range(min(5, num_frames)))
    if mode == "uniform":
        n = 5 if num_key_frames is None else int(num_key_frames)
        if n < 1:
            raise ValueError(f"num_key_frames must be >= 1, got {n}")
        n = min(n, num_frames)
        if n == 1:
            return [0]
        return sorted({int(round(i * (num_frames - 1) / (n - 1))) for i in range(n)})
    raise ValueError(f"key_frames must be 'official' or 'uniform', got {mode!r}")


class Sam2VideoHeadMixin:
    """Video half of ``predict_forward`` for a model with ``self.sam2`` (``Sam2VideoModel``) and the image head's
    ``sam2_preprocess`` (``sam2_image.Sam2ImageHeadMixin``): the interface ``seg_token``'s ``predict_video`` calls
    (``open_video``, ``video_key_frames``, ``video_masks_from_prompts``)."""

    open_video = staticmethod(VideoFrames)
    video_key_frames = staticmethod(key_frame_indices)

    @torch.no_grad()
    def video_masks_from_prompts(self, frames: Iterable, num_frames: int, key_frames: dict[int, Any],
                                 prompt_embeddings: torch.Tensor, threshold: float,
                                 object_score_gating: bool | None = None) -> list[np.ndarray]:
        """Masks ``(T, H, W)`` bool, one per row of ``prompt_embeddings`` (``[N, D]``, the projected ``[SEG]``
        states): the same embedding prompts every key frame (``key_frames``: index -> PIL frame), then every
        frame of ``frames`` (an iterable of PIL frames, read once, in order) is tracked or, for a key frame, takes
        its prompted mask. Logits are resized as on images (bilinear to ``sam2_image_size``, then to the frame's
        H x W), sigmoid, ``> threshold``."""
        n = prompt_embeddings.shape[0]
        if n == 0:
            return []
        gating = (bool(getattr(self.config, "sam2_video_object_score_gating", False))
                  if object_score_gating is None else bool(object_score_gating))
        with onloaded(self.sam2):
            return self._video_masks(frames, num_frames, key_frames, prompt_embeddings, threshold, gating)

    def _video_masks(self, frames, num_frames, key_frames, prompt_embeddings, threshold, gating):
        n = prompt_embeddings.shape[0]
        sam = self.sam2
        tracker = Sam2VideoTracker(sam, num_frames, object_score_gating=gating)
        for idx in sorted(key_frames):
            tracker.add_key_frame(idx, tracker.frame_features(self.sam2_preprocess(key_frames[idx])),
                                  prompt_embeddings)
        size = int(self.config.sam2_image_size)
        out: np.ndarray | None = None  # [N, T, H, W] bool, filled frame by frame
        count = 0
        for idx, frame in enumerate(frames):
            if idx >= num_frames:
                raise ValueError(f"the video has more than the {num_frames} frames it was said to have")
            shape = (frame.height, frame.width)
            if out is None:
                out = np.zeros((n, num_frames, *shape), dtype=np.bool_)
            elif shape != out.shape[2:]:
                raise ValueError(f"frame {idx} is {shape[1]}x{shape[0]}, frame 0 {out.shape[3]}x{out.shape[2]}: "
                                 "all frames of a video must have one size")
            low = tracker.key_frame_logits(idx)
            if low is None:
                if idx < min(key_frames):
                    # Meta's propagate_in_video starts at the first conditioning frame: earlier frames get no mask
                    low = torch.full((n, 1, 1, 1), NO_OBJ_SCORE)
                else:
                    low = tracker.track(idx, tracker.frame_features(self.sam2_preprocess(frame)))
            logits = F.interpolate(low.float(), size=(size, size), mode="bilinear", align_corners=False)
            logits = F.interpolate(logits, size=shape, mode="bilinear", align_corners=False)
            out[:, idx] = (logits[:, 0].sigmoid() > threshold).cpu().numpy()
            count += 1
        if count != num_frames:
            raise ValueError(f"the video gave {count} frames, {num_frames} expected")
        return list(out)


__all__ = ["Sam2VideoHeadMixin", "Sam2VideoTracker", "VideoFrames", "build_sam2_video", "key_frame_indices",
           "sam2_video_config"]
