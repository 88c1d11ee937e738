"""Tests of the exported configuration + modeling code of family ``sa2va-qwen2_5-vl``.

Everything is tiny and random, built here: a Qwen2.5-VL with a 64-wide, 2-layer LLM and a 2-block vision
tower, a SAM2 (hiera) at 128 px, and an offline WordLevel tokenizer with the Qwen and Sa2VA special tokens.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Sam2VideoConfig,  # noqa: E402
                          Sam2VideoMaskDecoderConfig, Sam2VideoPromptEncoderConfig)

from maskport.families.sa2va_qwen2_5_vl.remote import configuration_sa2va_qwen as cfg_mod  # noqa: E402
from maskport.families.sa2va_qwen2_5_vl.remote import modeling_sa2va_qwen as mod  # noqa: E402
from maskport.families.sa2va_qwen2_5_vl.remote.configuration_sa2va_qwen import Sa2VAQwenConfig  # noqa: E402
from maskport.families.sa2va_qwen2_5_vl.remote.modeling_sa2va_qwen import (  # noqa: E402
    Sa2VAQwenModel, build_prompt, select_seg_hidden_states)

EXPORT_DIR = Path(cfg_mod.__file__).resolve().parent
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
SA2VA_SPECIAL = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
SAM_SIZE = 128


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------
def make_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[UNK]", "system", "user", "assistant", "You", "are", "a", "helpful", "assistant.", "Please",
             "segment", "the", "cat.", "Sure,", "it", "is", "and", "dog."]
    words += [f"w{i}" for i in range(300 - len(words))]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                                          unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    t.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    t.add_tokens(SA2VA_SPECIAL, special_tokens=True)
    t.eos_token = "<|im_end|>"
    t.pad_token = "<|endoftext|>"
    return t


def make_config(tok, tie: bool = False, **kwargs) -> Sa2VAQwenConfig:
    ids = {k: tok.convert_tokens_to_ids(k) for k in QWEN_SPECIAL + SA2VA_SPECIAL}
    mllm = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                          "rope_theta": 10000.0},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie)
    s = SAM_SIZE
    sam2 = Sam2VideoConfig(
        vision_config=dict(
            backbone_config=dict(hidden_size=8, num_attention_heads=1, image_size=[s, s],
                                 blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                                 num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 2],
                                 global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4]),
            backbone_channel_list=[64, 32, 16, 8],
            backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
            fpn_hidden_size=32),
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(hidden_size=32, image_size=s, patch_size=16),
        mask_decoder_config=Sam2VideoMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                       iou_head_hidden_dim=32, num_hidden_layers=2),
        image_size=s, memory_attention_hidden_size=32, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[s // 16, s // 16],
        memory_encoder_hidden_size=32, memory_encoder_output_channels=16, mask_downsampler_embed_dim=32,
        memory_fuser_num_layers=1, memory_fuser_embed_dim=32, memory_fuser_intermediate_dim=128)
    kwargs.setdefault("image_processor", dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28))
    kwargs.setdefault("max_new_tokens", 8)
    return Sa2VAQwenConfig(mllm_config=mllm.to_dict(), sam2_config=sam2.to_dict(), seg_token_id=ids["[SEG]"],
                           maskport={"version": "test", "family": "sa2va-qwen2_5-vl", "mapping_version": "1"},
                           **kwargs)


def make_model(config, seed: int = 0) -> Sa2VAQwenModel:
    torch.manual_seed(seed)
    model = Sa2VAQwenModel(config).eval()
    with torch.no_grad():  # SAM2's init leaves some tensors at zero; make every tensor informative
        for name, p in model.named_parameters():
            if name.startswith("sam2.") and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def config(tok):
    return make_config(tok)


@pytest.fixture(scope="module")
def model(config):
    return make_model(config)


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    return Image.fromarray(rng.randint(0, 255, (50, 70, 3), dtype=np.uint8))


class ScriptedHead(torch.nn.Module):
    """Stands in for ``lm_head``: step k of generation makes ``script[k]`` the argmax."""

    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__()
        self.vocab_size, self.script, self.calls = vocab_size, list(script), 0

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size, dtype=torch.float32, device=hidden.device)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits.to(hidden.dtype) + 0 * hidden[..., :1]


class scripted:
    """Context manager: the model's lm_head answers ``words`` (token strings), then restores the head."""

    def __init__(self, model, tok, words):
        self.model, self.ids = model, tok.convert_tokens_to_ids(words)

    def __enter__(self):
        self.saved = self.model.mllm.lm_head
        self.model.mllm.lm_head = ScriptedHead(self.model.config.mllm_config.text_config.vocab_size, self.ids)
        return self

    def __exit__(self, *exc):
        self.model.mllm.lm_head = self.saved


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------
def test_bare_config_has_real_defaults():
    c = Sa2VAQwenConfig()
    assert isinstance(c.mllm_config, Qwen2_5_VLConfig) and isinstance(c.sam2_config, Sam2VideoConfig)
    assert c.model_type == "maskport_sa2va_qwen2_5_vl"
    assert set(Sa2VAQwenConfig.sub_configs) == {"mllm_config", "sam2_config"}
    assert c.sam2_image_size == 1024 and c.text_hidden_fcs_out_dim == 256
    assert c.seg_token == "[SEG]" and c.special_tokens == SA2VA_SPECIAL
    assert c.mask_threshold == 0.5 and c.max_new_tokens == 2048 and c.sam2_multimask_output is True
    assert c.sam2_pixel_mean == [0.485, 0.456, 0.406] and c.sam2_pixel_std == [0.229, 0.224, 0.225]
    assert c.image_processor["min_pixels"] == 512 * 28 * 28 and c.image_processor["max_pixels"] == 2048 * 28 * 28
    assert c.template["stop_words"] == ["<|im_end|>", "<|endoftext|>"]


def test_config_round_trip(tmp_path, config):
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "maskport_sa2va_qwen2_5_vl"
    assert raw["mllm_config"]["model_type"] == "qwen2_5_vl" and raw["sam2_config"]["model_type"] == "sam2_video"
    back = Sa2VAQwenConfig.from_pretrained(tmp_path)
    assert isinstance(back.mllm_config, Qwen2_5_VLConfig) and isinstance(back.sam2_config, Sam2VideoConfig)
    assert back.to_dict() == config.to_dict()
    assert back.sam2_image_size == SAM_SIZE and back.text_hidden_fcs_out_dim == 32
    with pytest.raises(ValueError, match="sam2_image_size"):
        Sa2VAQwenConfig(sam2_config=config.sam2_config.to_dict(), sam2_image_size=1024)


def test_xtuner_style_template_renders_the_same_prompt():
    xtuner_like = {"system": "<|im_start|>system\n{system}<|im_end|>\n", "default_system": "You are a helpful assistant.",
                   "user": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "suffix": "<|im_end|>",
                   "stop_words": ["<|im_end|>", "<|endoftext|>"]}
    a = build_prompt(Sa2VAQwenConfig(template=xtuner_like).template, "<image>Hi {x}", image_tokens=2)
    b = build_prompt(Sa2VAQwenConfig().template, "<image>Hi {x}", image_tokens=2)
    assert a == b
    upper = {"SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
             "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"}
    assert build_prompt(Sa2VAQwenConfig(template=upper).template, "q") == \
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_matches_sa2va_qwen_chat_rendering():
    t = Sa2VAQwenConfig().template
    assert build_prompt(t, "<image>Please segment the cat.", image_tokens=3) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>"
        "Please segment the cat.<|im_end|>\n<|im_start|>assistant\n")
    # text only: <image> removed, past_text prefixed
    assert build_prompt(t, "<image>Why?", past_text="Ctx. ") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nCtx. Why?<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------------------
# weights: save / load
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_from_pretrained_is_bit_exact(tmp_path, tok, tie):
    model = make_model(make_config(tok, tie=tie))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.startswith("mllm.model.language_model.") for k in state)
    assert any(k.startswith("mllm.model.visual.") for k in state)
    assert {"mllm.lm_head.weight", "text_hidden_fcs.0.weight", "text_hidden_fcs.0.bias", "text_hidden_fcs.2.weight",
            "text_hidden_fcs.2.bias", "sam2.no_memory_embedding"} <= set(state)
    assert model.text_hidden_fcs[2].weight.shape == (32, 64)

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    # files use the module names (no legacy ``mllm.model.layers`` / ``mllm.visual`` renaming on save)
    expected = set(state) - ({"mllm.lm_head.weight"} if tie else set())
    assert on_disk == expected

    loaded, info = Sa2VAQwenModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    new_state = loaded.state_dict()
    assert set(new_state) == set(state)
    for k, v in state.items():
        assert new_state[k].dtype == v.dtype and torch.equal(new_state[k], v), k
    if tie:
        assert loaded.mllm.lm_head.weight.data_ptr() == loaded.mllm.model.language_model.embed_tokens.weight.data_ptr()


def test_files_written_with_module_names_load_unchanged(tmp_path, config, model):
    """What maskport's converter writes: safetensors keyed by the module names, plus config.json."""
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = Sa2VAQwenModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    # and saving it again keeps the names
    out = tmp_path / "again"
    loaded.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(state)


def test_legacy_qwen_layout_still_loads(tmp_path, config, model):
    """transformers' scoped Qwen2.5-VL renamings still apply under ``mllm.`` (``model.layers`` -> native)."""
    state = {}
    for k, v in model.state_dict().items():
        k2 = k.replace("mllm.model.language_model.", "mllm.model.").replace("mllm.model.visual.", "mllm.visual.")
        state[k2] = v.clone().contiguous()
    config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = Sa2VAQwenModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k


_ALLOWED_IMPORTS = {"torch", "transformers", "numpy", "PIL", "__future__", "math", "copy", "typing", "contextlib",
                    "os", "re", "pathlib"}
# PyAV: only ``sam2_video.py``, only inside the function that decodes a video file (a clear ImportError otherwise)
_LAZY_OPTIONAL = {"sam2_video.py": {"av"}}


def _import_problems(path, shipped: set[str]) -> list[str]:
    """The imports of an exported file that break the rule: absolute imports outside ``_ALLOWED_IMPORTS``,
    relative imports of anything but a sibling module in ``shipped``."""
    problems = []
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {a.name.split(".")[0] for a in node.names}
            lazy = _LAZY_OPTIONAL.get(path.name, set())
            if roots <= lazy and id(node) not in top_level:
                continue
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only sibling files that travel with it
                if node.level != 1 or node.module not in shipped:
                    problems.append(f"{path.name}: from {'.' * node.level}{node.module or ''} import ...")
                continue
            roots = {node.module.split(".")[0]}
        else:
            continue
        if not roots <= _ALLOWED_IMPORTS:
            problems.append(f"{path.name}: imports {sorted(roots - _ALLOWED_IMPORTS)}")
    return problems


def test_exported_files_import_only_allowed_modules():
    """Every file an export carries (each registered family's code files and the shared heads it lists) imports
    only torch/transformers/numpy/PIL and the stdlib modules below, and relatively only files that the same export
    carries. Generated from the registry: a new family is checked without editing this test."""
    from maskport.families import FAMILIES
    from maskport.heads import remote_file

    assert FAMILIES
    for fam in FAMILIES.values():
        spec = fam.spec
        files = {name: fam.folder / "remote" / name for name in spec.code_files}
        files.update({f"{h}.py": remote_file(h) for h in spec.heads})
        shipped = {name.removesuffix(".py") for name in files}
        for name, path in files.items():
            assert not _import_problems(path, shipped), (spec.name, name, _import_problems(path, shipped))


def test_shared_head_files_import_only_allowed_modules():
    """Every file of ``maskport/heads/remote/`` (listed from the folder, so a head no family uses yet is checked
    too) imports only torch/transformers/numpy/PIL and the stdlib modules above, and relatively only other files
    of that folder."""
    from maskport.heads import REMOTE_DIR, remote_heads

    files = sorted(p for p in REMOTE_DIR.glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in files} == set(remote_heads()) and len(files) >= 4
    shipped = {p.stem for p in files}
    problems = [msg for path in files for msg in _import_problems(path, shipped)]
    assert not problems, problems


def test_automodel_trust_remote_code(tmp_path, config, model, tok, image):
    model.save_pretrained(tmp_path)
    for f in ("configuration_sa2va_qwen.py", "modeling_sa2va_qwen.py"):
        shutil.copy2(EXPORT_DIR / f, tmp_path / f)
    from maskport.heads import remote_file

    for head in ("image_utils", "seg_token", "sam2_image", "sam2_video"):
        shutil.copy2(remote_file(head), tmp_path / f"{head}.py")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["auto_map"] = {"AutoConfig": "configuration_sa2va_qwen.Sa2VAQwenConfig",
                       "AutoModel": "modeling_sa2va_qwen.Sa2VAQwenModel"}
    raw["architectures"] = ["Sa2VAQwenModel"]
    (tmp_path / "config.json").write_text(json.dumps(raw, indent=2))
    tok.save_pretrained(tmp_path)

    loaded, info = transformers.AutoModel.from_pretrained(tmp_path, trust_remote_code=True,
                                                          output_loading_info=True)
    assert type(loaded).__name__ == "Sa2VAQwenModel"
    assert not type(loaded).__module__.startswith("maskport")  # the copied file, not the package
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path)
    a = loaded.predict_forward(image=image, text="<image>Please segment the cat.", tokenizer=tok2)
    b = model.predict_forward(image=image, text="<image>Please segment the cat.", tokenizer=tok)
    assert a["prediction"] == b["prediction"]


# ---------------------------------------------------------------------------------------------------------------
# [SEG] hidden-state selection
# ---------------------------------------------------------------------------------------------------------------
def test_select_seg_hidden_states_synthetic():
    seg, prompt_len, C = 7, 4, 3
    # prompt has a literal [SEG] at 2 (ignored); generated: a, SEG, b, SEG, SEG(last, never fed back)
    sequences = torch.tensor([[1, 2, seg, 3, 5, seg, 6, seg, seg]])
    n_fed = sequences.shape[1] - 1                                     # 8 rows of hidden states
    rows = torch.arange(n_fed, dtype=torch.float32)[:, None].repeat(1, C)  # row i holds value i

    def layer(a, b):  # [1, b-a, C]; "embedding" layers hold garbage, only the last one counts
        return rows[a:b][None]

    steps = [(torch.full((1, prompt_len, C), -1.0), layer(0, prompt_len))]
    for i in range(prompt_len, n_fed):
        steps.append((torch.full((1, 1, C), -1.0), layer(i, i + 1)))
    picked = select_seg_hidden_states(tuple(steps), sequences, prompt_len, seg)
    # fed positions holding [SEG] after the prompt: 5 and 7; 2 (prompt) and 8 (never fed) are not picked
    assert picked[:, 0].tolist() == [5.0, 7.0]


@pytest.mark.parametrize("script,n_masks", [
    (["Sure,", "[SEG]", "and", "[SEG]", "<|im_end|>"], 2),
    (["Sure,", "[SEG]", "<|im_end|>"], 1),
    (["Sure,", "it", "is", "<|im_end|>"], 0),
    (["Sure,", "[SEG]", "[SEG]"], 1),  # cut off by max_new_tokens=3: the last [SEG] is never fed back
])
def test_one_mask_per_fed_back_seg(model, tok, image, script, n_masks):
    with scripted(model, tok, script):
        out = model.predict_forward(image=image, text="<image>Please segment the cat.", tokenizer=tok,
                                    max_new_tokens=3 if script[-1] == "[SEG]" else None)
    assert out["prediction"].split() == script
    assert len(out["prediction_masks"]) == n_masks
    for m in out["prediction_masks"]:
        assert isinstance(m, np.ndarray) and m.dtype == np.bool_ and m.shape == (1, image.height, image.width)


def test_masks_come_from_seg_hidden_states(model, tok, image):
    """Recompute the masks independently: teacher-forced MLLM forward -> hidden states at [SEG] -> fcs -> SAM2."""
    script = ["Sure,", "[SEG]", "and", "[SEG]", "<|im_end|>"]
    captured = {}
    real_generate = model.mllm.generate

    def spy(**kw):
        out = real_generate(**kw)
        captured.update(kw, sequences=out.sequences)
        return out

    model.mllm.generate = spy
    try:
        with scripted(model, tok, script):
            out = model.predict_forward(image=image, text="<image>Please segment the cat.", tokenizer=tok,
                                        return_probabilities=True)
    finally:
        del model.mllm.generate
    seq = captured["sequences"]
    prompt_len = captured["input_ids"].shape[1]
    seg_id = tok.convert_tokens_to_ids("[SEG]")
    with torch.no_grad():
        fwd = model.mllm(input_ids=seq[:, :-1], pixel_values=captured["pixel_values"],
                         image_grid_thw=captured["image_grid_thw"], output_hidden_states=True)
        last = fwd.hidden_states[-1][0]
        pos = [i for i in range(prompt_len, seq.shape[1] - 1) if seq[0, i] == seg_id]
        assert len(pos) == 2
        emb = model.text_hidden_fcs(last[pos])
        logits = model.sam2_mask_logits(model.sam2_preprocess(image), emb[None], multimask_output=True)[0]
        logits = torch.nn.functional.interpolate(logits[:, None], size=(SAM_SIZE, SAM_SIZE), mode="bilinear",
                                                 align_corners=False)
        logits = torch.nn.functional.interpolate(logits, size=(image.height, image.width), mode="bilinear",
                                                 align_corners=False)
        probs = logits[:, 0].sigmoid()
    assert len(out["prediction_probabilities"]) == 2
    for got, want in zip(out["prediction_probabilities"], probs):
        assert got.dtype == np.float32 and got.shape == (1, image.height, image.width)
        np.testing.assert_allclose(got[0], want.numpy(), atol=1e-5)
    # the two [SEG]s sit at different positions, so their embeddings (and masks) differ
    assert not torch.allclose(emb[0], emb[1])


def test_mask_threshold_and_probabilities(model, tok, image):
    script = ["Sure,", "[SEG]", "<|im_end|>"]
    with scripted(model, tok, script):
        out = model.predict_forward(image=image, text="<image>Please segment the cat.", tokenizer=tok,
                                    return_probabilities=True)
    (prob,), (mask,) = out["prediction_probabilities"], out["prediction_masks"]
    assert prob.dtype == np.float32 and prob.shape == mask.shape == (1, image.height, image.width)
    assert ((prob >= 0) & (prob <= 1)).all()
    np.testing.assert_array_equal(mask, prob > 0.5)
    for thr in (0.0, 1.0, float(np.median(prob))):
        with scripted(model, tok, script):
            m = model.predict_forward(image=image, text="<image>Please segment the cat.", tokenizer=tok,
                                      mask_threshold=thr)["prediction_masks"][0]
        np.testing.assert_array_equal(m, prob > thr)
    assert "prediction_probabilities" not in model.predict_forward(image=image, text="<image>Hi", tokenizer=tok)


# ---------------------------------------------------------------------------------------------------------------
# predict_forward contract
# ---------------------------------------------------------------------------------------------------------------
def test_predict_forward_contract_random_model(model, tok, image):
    out = model.predict_forward(image=image, text="<image>Please segment the cat.", tokenizer=tok)
    assert set(out) == {"prediction", "prediction_masks"}
    assert isinstance(out["prediction"], str) and isinstance(out["prediction_masks"], list)
    n_seg_fed = out["prediction"].split()[:-1].count("[SEG]")
    assert len(out["prediction_masks"]) == n_seg_fed


def test_prompt_fed_to_generate(model, tok, image):
    captured = {}
    real_generate = model.mllm.generate

    def spy(**kw):
        captured.update(kw)
        return real_generate(**kw)

    model.mllm.generate = spy
    try:
        model.predict_forward(image=image, text="<image>Please segment the cat.", tokenizer=tok, max_new_tokens=2)
    finally:
        del model.mllm.generate
    grid = captured["image_grid_thw"]
    # 50x70 -> qwen_vl_utils pre-resize to 56x56 -> 4x4 patches of 14 -> 4 tokens after the 2x2 merge
    assert grid.tolist() == [[1, 4, 4]]
    n_tokens = int(grid.prod()) // 4
    expected = build_prompt(model.config.template, "<image>Please segment the cat.", image_tokens=n_tokens)
    assert tok.decode(captured["input_ids"][0], skip_special_tokens=False).replace(" ", "") == \
        tok.decode(tok(expected, add_special_tokens=False)["input_ids"], skip_special_tokens=False).replace(" ", "")
    assert int((captured["input_ids"] == model.config.mllm_config.image_token_id).sum()) == n_tokens
    assert captured["do_sample"] is False and captured["output_hidden_states"] and captured["return_dict_in_generate"]
    assert captured["eos_token_id"] == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert captured["pixel_values"].shape == (16, 3 * 2 * 14 * 14)


def test_processor_argument_supplies_tokenizer_and_image_processor(model, tok, image):
    ip = model._qwen_image_processor()
    proc = SimpleNamespace(tokenizer=tok, image_processor=ip)
    with scripted(model, tok, ["[SEG]", "[SEG]", "<|im_end|>"]):
        out = model.predict_forward(image=image, text="<image>Please segment the cat.", processor=proc)
    assert len(out["prediction_masks"]) == 2


def test_text_only_returns_no_masks(model, tok):
    with scripted(model, tok, ["Sure,", "[SEG]", "and", "<|im_end|>"]):
        out = model.predict_forward(text="Please segment the cat.", tokenizer=tok, return_probabilities=True)
    assert out["prediction"].split() == ["Sure,", "[SEG]", "and", "<|im_end|>"]
    assert out["prediction_masks"] == [] and out["prediction_probabilities"] == []


def test_unsupported_inputs_raise(model, tok, image):
    with pytest.raises(ValueError, match="either image= or video="):  # video itself: tests/test_video_predict.py
        model.predict_forward(image=image, video=[image, image], text="<image>x", tokenizer=tok)
    with pytest.raises(NotImplementedError, match="mask_prompts .* Qwen-VL .* silently ignores"):
        model.predict_forward(image=image, text="<image>x", mask_prompts=[np.zeros((1, 50, 70))], tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        model.predict_forward(image=image, text="<image>x")


def test_bf16(config, tok, image):
    model = make_model(config).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with scripted(model, tok, ["Sure,", "[SEG]", "and", "[SEG]", "<|im_end|>"]):
        out = model.predict_forward(image=image, text="<image>Please segment the cat.", tokenizer=tok,
                                    return_probabilities=True)
    assert len(out["prediction_masks"]) == 2
    for m, p in zip(out["prediction_masks"], out["prediction_probabilities"]):
        assert m.dtype == np.bool_ and m.shape == (1, image.height, image.width)
        assert p.dtype == np.float32 and np.isfinite(p).all()


# ---------------------------------------------------------------------------------------------------------------
# SAM2 path
# ---------------------------------------------------------------------------------------------------------------
def test_sam2_mask_logits_shapes(model):
    x = torch.randn(2, 3, SAM_SIZE, SAM_SIZE)
    lang = torch.randn(2, 3, 32)
    low = SAM_SIZE // 4
    single = model.sam2_mask_logits(x, lang)
    multi = model.sam2_mask_logits(x, lang, multimask_output=True)
    assert single.shape == multi.shape == (2, 3, low, low) and single.dtype == torch.float32
    assert model.sam2_mask_logits(x, lang[:, :0]).shape == (2, 0, low, low)
    # prompts are independent: prompt 1 alone gives the same logits as within the batch of 3
    alone = model.sam2_mask_logits(x, lang[:, 1:2])
    torch.testing.assert_close(alone[:, 0], single[:, 1], atol=1e-5, rtol=1e-5)


def test_empty_point_prompt_is_two_not_a_point_tokens(model):
    """Meta's prompt encoder, given points=(zeros(B,1,2), -ones(B,1)) and no boxes, pads one more label -1
    point; every label -1 point embeds to exactly ``not_a_point_embed``. transformers' must agree bit for bit."""
    pe = model.sam2.prompt_encoder
    sparse, dense = pe(input_points=torch.zeros(2, 3, 1, 2), input_labels=-torch.ones(2, 3, 1, dtype=torch.int32),
                       input_boxes=None, input_masks=None)
    assert sparse.shape == (2, 3, 2, 32)
    assert torch.equal(sparse, pe.not_a_point_embed.weight.view(1, 1, 1, -1).expand(2, 3, 2, -1))
    assert torch.equal(dense, pe.no_mask_embed.weight.view(1, -1, 1, 1).expand(2, -1, SAM_SIZE // 16, SAM_SIZE // 16))


def test_sam2_preprocess_is_square_resize_and_imagenet_norm(model, image):
    x = model.sam2_preprocess(image)
    assert x.shape == (1, 3, SAM_SIZE, SAM_SIZE) and x.dtype == torch.float32
    ref = np.asarray(image.resize((SAM_SIZE, SAM_SIZE), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = (ref - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_smart_resize_rule():
    assert mod.smart_resize(50, 70, 28, 3136, 12845056) == (56, 56)
    assert mod.smart_resize(1000, 1500, 28, 512 * 784, 2048 * 784) == (1008, 1512)
    h, w = mod.smart_resize(4000, 3000, 28, 512 * 784, 2048 * 784)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 2048 * 784
