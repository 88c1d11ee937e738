"""``predict_forward(video=...)`` of the exports (shared ``seg_token.predict_video`` + ``sam2_video``), on the tiny
Qwen2.5-VL export model of ``test_export_modeling`` (random weights; the answer is scripted so that it holds
``[SEG]``).

- the MLLM input: the key frames' prompt and pixels equal a hand-built Sa2VA-style prompt (N image items, then the
  text) and transformers' own Qwen2-VL image processor run on each frame;
- key frames: each frame's mask equals the image head's mask for that frame with the same ``[SEG]`` embedding (a
  key frame is an initial conditioning frame: no memory, the image path's prompt);
- the propagation itself is checked against Meta's video predictor in ``tests/test_sam2_video.py``;
- a list of frames, an array, a frame folder give the same masks; a video file the masks of its decoded frames;
- the export predicts a video in a process where maskport cannot be imported;
- streaming: the peak memory of a 64-frame video exceeds that of a 16-frame one by no more than the answer's own
  masks (a run that holds the decoded frames is shown to exceed the bound).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from .test_export_modeling import (EXPORT_DIR, build_prompt, make_config, make_model,  # noqa: E402
                                   make_tokenizer, scripted)

SCRIPT = ["Sure,", "[SEG]", "and", "[SEG]", "<|im_end|>"]
TEXT = "<image>Please segment the cat and the dog."


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(make_config(tok))


def _frames(n: int, w: int = 72, h: int = 56, seed: int = 0) -> list[Image.Image]:
    """A bright square moving over noise."""
    rng = np.random.RandomState(seed)
    out = []
    for t in range(n):
        a = rng.randint(0, 90, (h, w, 3), dtype=np.uint8)
        x = 4 + 3 * t % (w - 20)
        a[10:26, x:x + 16] = (230, 200, 40)
        out.append(Image.fromarray(a))
    return out


def _run(model, tok, video, **kw):
    """predict_forward on a video with the scripted answer; also returns the [SEG] embeddings it used and the
    generate() inputs."""
    seen = {}
    fcs = model.text_hidden_fcs
    real_fcs_forward = fcs.forward
    real_generate = model.mllm.generate

    def spy_fcs(x):
        y = real_fcs_forward(x)
        seen["embeddings"] = y.detach().clone()
        return y

    def spy_generate(**g):
        seen["generate"] = g
        return real_generate(**g)

    fcs.forward = spy_fcs
    model.mllm.generate = spy_generate
    try:
        with scripted(model, tok, SCRIPT):
            out = model.predict_forward(video=video, text=TEXT, tokenizer=tok, **kw)
    finally:
        del fcs.forward
        del model.mllm.generate
    return out, seen


def test_video_prompt_is_sa2va_s(model, tok):
    frames = _frames(8)
    out, seen = _run(model, tok, frames)
    g = seen["generate"]
    # hand-built: 5 image items (transformers' Qwen2-VL processor on each key frame), then the text
    import transformers

    # the PIL backend: it resizes like the slow processor of transformers 4.x that Sa2VA's code ran with
    s = model.config.image_processor
    ip_cls = getattr(transformers, "Qwen2VLImageProcessorPil", transformers.Qwen2VLImageProcessor)
    ip = ip_cls(size={"shortest_edge": s["min_pixels"], "longest_edge": s["max_pixels"]},
                patch_size=s["patch_size"], temporal_patch_size=s["temporal_patch_size"],
                merge_size=s["merge_size"], image_mean=s["image_mean"], image_std=s["image_std"])
    per = [ip(images=[f], return_tensors="pt") for f in frames[:5]]
    counts = [int(p["image_grid_thw"].prod()) // s["merge_size"] ** 2 for p in per]
    t = model.config.template
    vision = "".join(t["vision_start"] + t["image_token"] * n + t["vision_end"] for n in counts)
    body = vision + TEXT.replace("<image>", "")
    system = t["system"].replace("{system}", t["default_system"]) if t.get("default_system") else ""
    want = system + t["user"].replace("{input}", body) + t.get("assistant_prefix", "")
    assert want == build_prompt(t, TEXT, "", counts)
    assert g["input_ids"][0].tolist() == tok(want, add_special_tokens=False)["input_ids"]
    assert torch.allclose(g["pixel_values"], torch.cat([p["pixel_values"] for p in per]), atol=1e-6)
    assert torch.equal(g["image_grid_thw"], torch.cat([p["image_grid_thw"] for p in per]))
    assert out["prediction"].split() == SCRIPT
    assert len(out["prediction_masks"]) == 2
    for m in out["prediction_masks"]:
        assert m.dtype == np.bool_ and m.shape == (8, 56, 72)


@pytest.mark.parametrize("mode,n,keys", [("official", None, [0, 1, 2, 3, 4]), ("uniform", 3, [0, 4, 9])])
def test_key_frames_are_the_image_head(model, tok, mode, n, keys):
    frames = _frames(10)
    out, seen = _run(model, tok, frames, key_frames=mode, num_key_frames=n)
    assert len(seen["generate"]["image_grid_thw"]) == len(keys)
    emb = seen["embeddings"]
    assert emb.shape[0] == 2
    tracked = [t for t in range(10) if t not in keys]
    with torch.no_grad():
        for k in keys:
            masks, _ = model.masks_from_prompts(frames[k], emb, model.config.mask_threshold, False)
            for obj in range(2):
                assert np.array_equal(out["prediction_masks"][obj][k], masks[obj][0]), (k, obj)
        # tracked frames are not simply the image head (the memory conditions them)
        differ = 0
        for t in tracked:
            masks, probs = model.masks_from_prompts(frames[t], emb, 0.5, True)
            differ += sum(int((out["prediction_masks"][o][t] != masks[o][0]).sum()) for o in range(2))
    assert differ > 0


def test_video_sources_agree(model, tok, tmp_path):
    frames = _frames(7)
    a, _ = _run(model, tok, frames)
    b, _ = _run(model, tok, np.stack([np.asarray(f) for f in frames]))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        f.save(folder / f"{i}.png")  # 10.png would sort after 9.png: natural order
    (folder / "notes.txt").write_text("not a frame")
    c, _ = _run(model, tok, str(folder))
    for other in (b, c):
        assert other["prediction"] == a["prediction"]
        for x, y in zip(a["prediction_masks"], other["prediction_masks"]):
            assert np.array_equal(x, y)


def _write_video(path, frames):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_image(f)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_file_is_read_with_pyav(model, tok, tmp_path):
    """A video file gives the masks of the frames PyAV decodes from it (lossy codec: compared with the decoded
    frames, not the originals)."""
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    _write_video(path, _frames(7, 64, 48))
    with av.open(str(path)) as c:
        decoded = [f.to_image().convert("RGB") for f in c.decode(c.streams.video[0])]
    assert len(decoded) == 7
    a, _ = _run(model, tok, str(path))
    b, _ = _run(model, tok, decoded)
    assert a["prediction"] == b["prediction"]
    for x, y in zip(a["prediction_masks"], b["prediction_masks"]):
        assert x.shape == (7, 48, 64) and np.array_equal(x, y)


def test_video_file_without_pyav_is_a_clear_error(model, tok, tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ImportError, match="PyAV"):
        model.predict_forward(video=str(path), text=TEXT, tokenizer=tok)


def test_bad_video_inputs(model, tok, tmp_path):
    frame = _frames(1)[0]
    with pytest.raises(ValueError, match="either image= or video="):
        model.predict_forward(image=frame, video=[frame], text=TEXT, tokenizer=tok)
    with pytest.raises(NotImplementedError, match="return_probabilities"):
        model.predict_forward(video=[frame], text=TEXT, tokenizer=tok, return_probabilities=True)
    with pytest.raises(ValueError, match="no frames"):
        model.predict_forward(video=[], text=TEXT, tokenizer=tok)
    with pytest.raises(FileNotFoundError):
        model.predict_forward(video=str(tmp_path / "nope"), text=TEXT, tokenizer=tok)
    with pytest.raises(TypeError, match="frame"):
        with scripted(model, tok, SCRIPT):
            model.predict_forward(video=[frame, "x"], text=TEXT, tokenizer=tok)
    with pytest.raises(ValueError, match="one size"):
        with scripted(model, tok, SCRIPT):
            model.predict_forward(video=[frame, frame.resize((30, 30))] * 3, text=TEXT, tokenizer=tok)
    with pytest.raises(ValueError, match="key_frames"):
        model.predict_forward(video=[frame], text=TEXT, tokenizer=tok, key_frames="every")


# ------------------------------------------------------------------------------------------------ as deployed
def _export_folder(model, tok, where):
    model.save_pretrained(where)
    for f in ("configuration_sa2va_qwen.py", "modeling_sa2va_qwen.py"):
        shutil.copy2(EXPORT_DIR / f, where / f)
    from maskport.heads import remote_file

    for head in ("image_utils", "seg_token", "sam2_image", "sam2_video"):
        shutil.copy2(remote_file(head), where / f"{head}.py")
    raw = json.loads((where / "config.json").read_text())
    raw["auto_map"] = {"AutoConfig": "configuration_sa2va_qwen.Sa2VAQwenConfig",
                       "AutoModel": "modeling_sa2va_qwen.Sa2VAQwenModel"}
    (where / "config.json").write_text(json.dumps(raw, indent=2))
    tok.save_pretrained(where)


RUN_VIDEO = textwrap.dedent('''
    import json, pathlib, re, sys
    sys.modules["maskport"] = None  # any import of maskport fails
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer
    export, out_path, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    m = AutoModel.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    t = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
    seg = t.convert_tokens_to_ids("[SEG]")
    kw = dict(text="<image>segment it", tokenizer=t, max_new_tokens=2,
              generation_kwargs={"sequence_bias": {(seg,): 50.0}})
    def status(key):  # KiB
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    def reset_peak():  # Linux: writing 5 to clear_refs resets the high-water mark VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")
    first = sorted(pathlib.Path(folders[0]).iterdir())
    m.predict_forward(video=[Image.open(p).convert("RGB") for p in first[:4]], **kw)  # warm-up
    report = {"growth_kb": [], "mask_bytes": []}
    for i, folder in enumerate(folders):
        start = reset_peak()
        if folder.startswith("hold:"):  # what a non-streaming reader does: every decoded frame in memory at once
            video = [Image.open(p).convert("RGB") for p in sorted(pathlib.Path(folder[5:]).iterdir())]
        else:
            video = folder
        out = m.predict_forward(video=video, **kw)
        report["growth_kb"].append(status("VmHWM") - start)  # the run's peak above the RSS it started with
        report["mask_bytes"].append(sum(x.nbytes for x in out["prediction_masks"]))
        if i == 0:
            np.savez(out_path, *out["prediction_masks"])
            report["prediction"] = out["prediction"]
        del out, video
    print(json.dumps(report))
''')


def _run_subprocess(export, out, *folders):
    r = subprocess.run([sys.executable, "-c", RUN_VIDEO, str(export), str(out), *map(str, folders)],
                       capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                            "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines, (r.stdout[-2000:], r.stderr[-2000:])
    return json.loads(lines[-1])


def _frame_folder(where, n, w=640, h=480):
    where.mkdir()
    rng = np.random.RandomState(5)
    for t in range(n):
        a = rng.randint(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(a).save(where / f"{t:05d}.bmp")  # fast to read and write
    return where


@pytest.fixture(scope="module")
def export_dir(model, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("video_export")
    _export_folder(model, tok, d)
    return d


def test_export_predicts_video_without_maskport(export_dir, model, tok, tmp_path):
    frames = _frame_folder(tmp_path / "f", 9, 64, 48)
    res = _run_subprocess(export_dir, tmp_path / "m.npz", frames)
    assert "[SEG]" in res["prediction"]
    got = np.load(tmp_path / "m.npz")
    seg = tok.convert_tokens_to_ids("[SEG]")
    want = model.predict_forward(video=str(frames), text="<image>segment it", tokenizer=tok, max_new_tokens=2,
                                 generation_kwargs={"sequence_bias": {(seg,): 50.0}})
    assert want["prediction"] == res["prediction"]
    assert len(got.files) == len(want["prediction_masks"]) >= 1
    for i, m in enumerate(want["prediction_masks"]):
        assert m.shape == (9, 48, 64) and np.array_equal(got[f"arr_{i}"], m)


def test_streaming_memory_is_flat_from_16_to_64_frames(export_dir, tmp_path):
    """One process: a 16-frame video, then a 64-frame one (640x480 frames), then the same 64 frames handed over
    already decoded; each run's peak RSS above the RSS it started with (Linux's VmHWM, reset before each run). The
    64-frame run may exceed the 16-frame one only by the answer's larger masks (T x 480 x 640 bool per [SEG],
    allocated once) plus 8 MiB of allocator noise; the third run, which holds the frames (0.9 MB each), must break
    that bound, or the measurement could not see frames being kept."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    f16 = _frame_folder(tmp_path / "f16", 16)
    f64 = _frame_folder(tmp_path / "f64", 64)
    r = _run_subprocess(export_dir, tmp_path / "a.npz", f16, f64, f"hold:{f64}")
    g16, g64, g_held = r["growth_kb"]
    m16, m64, _ = r["mask_bytes"]
    allowed_kb = (m64 - m16) / 1024 + 8 * 1024
    print("peak RSS growth (KiB): 16 frames", g16, "64 frames", g64, "64 held", g_held, "mask bytes", m16, m64)
    assert g64 - g16 <= allowed_kb, (r, allowed_kb)
    assert g_held - g16 > allowed_kb, (r, allowed_kb)
