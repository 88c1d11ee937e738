"""The Sa2VA-Qwen3-VL fixture: the same tiny training run as :mod:`maskport.testing.sa2va_qwen2_5_vl` (genuine
mmengine ``Runner`` + peft LoRA on every linear of ``model.language_model``, ``modules_to_save`` embed_tokens/lm_head,
trainable SAM2 mask decoder, ``text_hidden_fcs``), on a tiny ``Qwen3VLForConditionalGeneration`` (patch 16, image
mean/std 0.5, DeepStack merger features injected into the first LLM layers) with a ``Qwen3VLProcessor``. The training
config names Sa2VA's ``Qwen3VL`` wrapper and ``Qwen3VLProcessor``, as ``sa2va_qwen3_4b.py`` does."""

from __future__ import annotations

from pathlib import Path

from .sa2va_qwen2_5_vl import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, QwenArch, Sa2VAQwenFixture, make_sa2va_qwen_fixture
from .tokenizers import QWEN_CHAT_TEMPLATE, qwen_special_ids

__all__ = ["QWEN3_VL", "make_qwen3_processor", "make_sa2va_qwen3_fixture", "tiny_qwen3_vl_config"]


def tiny_qwen3_vl_config(vocab_size: int):
    """Tiny Qwen3-VL config whose special-token ids match :func:`maskport.testing.tokenizers.make_tiny_tokenizer`:
    2 LLM layers (q/k norms, head_dim 16, interleaved M-RoPE), 2 vision blocks with DeepStack taps after both."""
    from transformers import Qwen3VLConfig

    ids = qwen_special_ids()
    text_config = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, hidden_act="silu", max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision_config = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )
    cfg = Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    cfg.bos_token_id = ids["<|endoftext|>"]
    cfg.eos_token_id = ids["<|im_end|>"]
    cfg.pad_token_id = ids["<|endoftext|>"]
    return cfg


def make_qwen3_processor(tokenizer):
    """``Qwen3VLProcessor``: Qwen2-VL image processing with patch 16 and mean/std 0.5 (Qwen3-VL's
    ``preprocessor_config.json``), Qwen3-VL's video processor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    kw = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor = Qwen2VLImageProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, **kw)
    video_processor = Qwen3VLVideoProcessor(**kw)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=QWEN_CHAT_TEMPLATE)


QWEN3_VL = QwenArch(tiny_qwen3_vl_config, "Qwen3VLForConditionalGeneration", make_qwen3_processor, "Qwen3VLProcessor",
                    "projects.sa2va.models.mllm.qwen3vl.Qwen3VL", "sa2va_tiny_qwen3vl.py", token_types=True)


def make_sa2va_qwen3_fixture(root: Path, *, seed: int = 0, train_steps: int = 2,
                             base_vocab_size: int | None = None) -> Sa2VAQwenFixture:
    """The tiny Sa2VA-Qwen3-VL run under ``root`` (see :func:`make_sa2va_qwen_fixture`)."""
    return make_sa2va_qwen_fixture(root, seed=seed, train_steps=train_steps, base_vocab_size=base_vocab_size,
                                   arch=QWEN3_VL)
