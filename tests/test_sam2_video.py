"""SAM2's video parts in the exports: the Meta -> ``Sam2VideoModel`` mapping and the exports' language-prompted video
tracker (``heads/remote/sam2_video.py``) against Meta's own video predictor (``sam2.sam2_video_predictor``).

Meta's predictor is fed what Sa2VA feeds its modified predictor: on each key frame an "empty" click (one point at
(0, 0), label -1, which embeds exactly like the padding point Sa2VA's ``add_language_embd`` puts there) with the
language embedding appended to the sparse prompt (a wrapper on Meta's prompt encoder, active only while the key
frames are added), then ``propagate_in_video`` over every frame. Both sides run the same randomised tiny SAM2
(``test_sam2_mapping.TINY_MODEL_CFG``: SAM2.1 flags, 1 memory-attention layer, 16-channel memory) in float32; the
low-resolution mask logits of every frame are compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sam2")
pytest.importorskip("hydra.utils")

from maskport.convert.plan import build_plan  # noqa: E402
from maskport.convert.sources import StateDictSource  # noqa: E402
from maskport.heads.remote.sam2_video import Sam2VideoTracker, build_sam2_video, key_frame_indices  # noqa: E402
from maskport.heads.sam2 import hf_sam2_video_config, sam2_rules, spec_from_meta_config  # noqa: E402

from .test_sam2_mapping import TINY_MODEL_CFG, _instantiate, _materialise, _randomise  # noqa: E402

TOL = 1e-4  # low-resolution mask logits, fp32 (measured below: see the asserts' messages)
T = 10
S = 256


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    meta = _instantiate(TINY_MODEL_CFG).eval()
    _randomise(meta, seed=11)
    state = meta.state_dict()
    spec = spec_from_meta_config({"model": TINY_MODEL_CFG})
    config = hf_sam2_video_config(spec)
    src = StateDictSource("sam2", "tiny.pt", state, "tiny randomised SAM2")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_sam2_video(config).state_dict().items()}
    plan = build_plan(sam2_rules(target_prefix=""), {"sam2": src}, out_dtype=torch.float32, expected=expected)
    hf = build_sam2_video(config).eval()
    missing, unexpected = hf.load_state_dict(_materialise(plan), strict=True)
    assert not missing and not unexpected
    predictor = _instantiate({**TINY_MODEL_CFG, "_target_": "sam2.sam2_video_predictor.SAM2VideoPredictor"}).eval()
    predictor.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(3)
    # a smooth moving pattern plus noise, so that consecutive frames are alike as in a video
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    frames = []
    for t in range(T):
        blob = torch.exp(-((xx - 0.6 + 0.12 * t) ** 2 + (yy + 0.2) ** 2) * 6)
        frames.append(torch.stack([blob * 2 - 0.5, blob - 0.2, -blob]) + 0.3 * torch.randn(3, S, S, generator=g))
    pixels = torch.stack(frames).float()
    language = torch.randn(2, 32, generator=g)  # two objects ([SEG]s), prompt width = d_model
    return dict(hf=hf, predictor=predictor, pixels=pixels, language=language)


def _meta_logits(predictor, pixels, language_rows, key_frames, tmp_path, *, gating: bool) -> torch.Tensor:
    """Meta's predictor, one object (one language embedding) at a time as Sa2VA runs it: ``[T, 1, h, w]``."""
    frame_dir = tmp_path / "jpg"
    frame_dir.mkdir(exist_ok=True)
    for t in range(pixels.shape[0]):
        Image.new("RGB", (8, 8)).save(frame_dir / f"{t:05d}.jpg")
    outs = []
    original_forward = predictor.sam_prompt_encoder.forward
    current = {"language": None}

    def with_language(points=None, boxes=None, masks=None):
        sparse, dense = original_forward(points=points, boxes=boxes, masks=masks)
        if current["language"] is not None:
            sparse = torch.cat([sparse, current["language"].reshape(1, 1, -1).to(sparse.dtype)], dim=1)
        return sparse, dense

    predictor.sam_prompt_encoder.forward = with_language
    predictor.pred_obj_scores = gating  # SAM2Base gates masks and object pointers only when this is set
    try:
        for row in language_rows:
            state = predictor.init_state(str(frame_dir))
            state["images"] = pixels.clone()          # our frames, already normalised (what the tracker gets)
            state["num_frames"] = pixels.shape[0]
            state["cached_features"] = {}
            side = S // 4
            state["video_height"] = state["video_width"] = side  # low-res logits come back unresized
            for k in key_frames:
                current["language"] = row
                predictor.add_new_points_or_box(state, frame_idx=k, obj_id=1, points=np.zeros((1, 2), np.float32),
                                                labels=np.array([-1], np.int32))
                current["language"] = None
            got = {t: m for t, _, m in predictor.propagate_in_video(state)}
            first = min(key_frames)
            outs.append(torch.stack([got[t][0] if t >= first else torch.full((1, side, side), -1024.0)
                                     for t in range(pixels.shape[0])]))
    finally:
        predictor.sam_prompt_encoder.forward = original_forward
        predictor.pred_obj_scores = True
    return torch.stack(outs, dim=1)[:, :, 0]  # [T, N, h, w]


def _our_logits(hf, pixels, language, key_frames, *, gating: bool) -> torch.Tensor:
    tracker = Sam2VideoTracker(hf, pixels.shape[0], object_score_gating=gating)
    for k in key_frames:
        tracker.add_key_frame(k, tracker.frame_features(pixels[k:k + 1]), language)
    out = []
    for t in range(pixels.shape[0]):
        low = tracker.key_frame_logits(t)
        if low is None:
            low = (torch.full((language.shape[0], 1, S // 4, S // 4), -1024.0) if t < min(key_frames)
                   else tracker.track(t, tracker.frame_features(pixels[t:t + 1])))
        out.append(low[:, 0])
    return torch.stack(out)  # [T, N, h, w]


@pytest.mark.parametrize("key_frames,gating", [
    (key_frame_indices(T, "official"), False),        # Sa2VA's released code: first 5 frames, no gating
    (key_frame_indices(T, "uniform", 3), True),       # 0, 4/5, 9: memory of a later key frame; Meta's gating
    ([0], True),                                      # one click-like prompt, then 9 tracked frames
])
@torch.no_grad()
def test_tracker_matches_meta_video_predictor(models, key_frames, gating, tmp_path):
    ours = _our_logits(models["hf"], models["pixels"], models["language"], key_frames, gating=gating)
    theirs = _meta_logits(models["predictor"], models["pixels"], models["language"], key_frames, tmp_path,
                          gating=gating)
    assert ours.shape == theirs.shape == (T, 2, S // 4, S // 4)
    tracked = [t for t in range(T) if t not in key_frames]
    assert len(tracked) >= 5
    diff = (ours - theirs).abs().amax(dim=(1, 2, 3))
    assert diff.max().item() <= TOL, f"max |diff| per frame: {diff.tolist()}"
    # non-trivial: the two prompts give two masks, tracked frames' logits vary, and differ from what the same
    # frame gives as a key frame
    assert (ours[:, 0] - ours[:, 1]).abs().max() > 1e-2
    assert ours[tracked].std() > 0.1
    t = tracked[-1]
    alone = Sam2VideoTracker(models["hf"], T)
    as_key = alone.add_key_frame(t, alone.frame_features(models["pixels"][t:t + 1]), models["language"])[:, 0]
    assert (as_key - ours[t]).abs().max() > 1e-2  # the memory really conditioned the tracked frame


def test_key_frame_indices():
    assert key_frame_indices(3, "official") == [0, 1, 2]
    assert key_frame_indices(300, "official") == [0, 1, 2, 3, 4]
    assert key_frame_indices(10, "uniform", 3) == [0, 4, 9] or key_frame_indices(10, "uniform", 3) == [0, 5, 9]
    assert key_frame_indices(2, "uniform", 5) == [0, 1]
    assert key_frame_indices(7, "uniform", 1) == [0]
    for bad in (lambda: key_frame_indices(0), lambda: key_frame_indices(5, "random"),
                lambda: key_frame_indices(5, "official", 3), lambda: key_frame_indices(5, "uniform", 0)):
        with pytest.raises(ValueError):
            bad()
