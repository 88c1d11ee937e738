"""Sanity checks of the Sa2VA/Qwen2.5-VL fixture (maskport.testing.sa2va_qwen2_5_vl)."""

import json
import re

import pytest
import torch

from maskport.testing.common import SPECIAL_TOKENS
from maskport.testing.sa2va_qwen2_5_vl import _build_lora_config, make_sa2va_qwen_fixture
from maskport.testing.sam2 import build_meta_sam2
from maskport.testing.tokenizers import QWEN_SPECIAL_TOKENS

_CKPT_KEY_PATTERNS = [
    r"mllm\.model\.base_model\.model\.model\.language_model\.layers\.\d+\."
    r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.lora_[AB]\.default\.weight",
    r"mllm\.model\.base_model\.model\.model\.language_model\.embed_tokens\.modules_to_save\.default\.weight",
    r"mllm\.model\.base_model\.model\.lm_head\.modules_to_save\.default\.weight",
    r"grounding_encoder\.sam2_model\.sam_mask_decoder\..+",
    r"text_hidden_fcs\.[02]\.(weight|bias)",
]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_sa2va_qwen_fixture(tmp_path_factory.mktemp("sa2va_fixture"), seed=0)


@pytest.fixture(scope="module")
def ckpt(fx):
    return torch.load(fx.ckpt, map_location="cpu", weights_only=False)


def test_ckpt_is_mmengine_file_with_trainable_subset_only(fx, ckpt):
    assert fx.ckpt.name == "iter_2.pth"
    assert set(ckpt) == {"meta", "state_dict", "message_hub", "param_schedulers"}
    assert ckpt["meta"]["iter"] == 2
    sd = ckpt["state_dict"]
    for k, v in sd.items():
        assert any(re.fullmatch(p, k) for p in _CKPT_KEY_PATTERNS), k
        assert v.dtype == torch.bfloat16, k
    n_layers = fx.peft_model.config.text_config.num_hidden_layers
    lora = [k for k in sd if ".lora_" in k]
    assert len(lora) == n_layers * 7 * 2
    assert sum("modules_to_save" in k for k in sd) == 2
    assert sum(k.startswith("text_hidden_fcs.") for k in sd) == 4
    dec = {k for k in sd if "sam_mask_decoder" in k}
    assert dec == {f"grounding_encoder.sam2_model.sam_mask_decoder.{k}" for k in fx.meta_sam2.sam_mask_decoder.state_dict()}
    # the embeddings were resized to the tokenizer with the 5 added tokens
    assert sd[lora[0].split(".layers.")[0] + ".embed_tokens.modules_to_save.default.weight"].shape[0] == len(fx.tokenizer)
    cfg = ckpt["meta"]["cfg"]
    assert f"path = '{fx.base_dir}'" in cfg and "template = 'qwen_chat'" in cfg
    assert "r=8" in cfg.replace(" ", "") and "lora_alpha=16" in cfg.replace(" ", "")
    for t in SPECIAL_TOKENS:
        assert f"'{t}'" in cfg


def test_lora_b_nonzero_and_oracle_matches_ckpt(fx, ckpt):
    sd = ckpt["state_dict"]
    lora_b = [k for k in sd if ".lora_B." in k]
    assert lora_b and all(sd[k].float().abs().sum() > 0 for k in lora_b)
    live = dict(fx.peft_model.named_parameters())
    for k, v in sd.items():
        if k.startswith("mllm.model."):
            assert torch.equal(live[k[len("mllm.model."):]], v.float()), k
        elif k.startswith("grounding_encoder.sam2_model."):
            assert torch.equal(fx.meta_sam2.state_dict()[k[len("grounding_encoder.sam2_model."):]], v.float()), k
        else:
            assert torch.equal(fx.text_hidden_fcs.state_dict()[k[len("text_hidden_fcs."):]], v.float()), k


def test_base_folder_loads_and_matches_oracle(fx):
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(fx.base_dir, dtype=torch.float32)
    assert base.config.tie_word_embeddings is False
    tok = AutoTokenizer.from_pretrained(fx.base_dir)
    assert len(tok) == base.config.text_config.vocab_size == len(fx.tokenizer) - len(SPECIAL_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    assert base.config.image_token_id == ids["<|image_pad|>"]
    assert base.config.vision_start_token_id == ids["<|vision_start|>"]
    # frozen base weights in the oracle are exactly the saved ones
    oracle = fx.peft_model.base_model.model.state_dict()
    for k, v in base.state_dict().items():
        if "embed_tokens" in k or "lm_head" in k:
            continue  # resized + wrapped in modules_to_save in the oracle
        ok = re.sub(r"(language_model\.layers\.\d+\.\w+\.\w+_proj)\.(weight|bias)", r"\1.base_layer.\2", k)
        assert torch.equal(oracle[ok], v), k
    proc = AutoProcessor.from_pretrained(fx.base_dir)
    img = (torch.rand(70, 90, 3) * 255).to(torch.uint8).numpy()
    enc = proc(text=["<|vision_start|><|image_pad|><|vision_end|>the cat"], images=[img], return_tensors="pt")
    n_img = int((enc["input_ids"] == ids["<|image_pad|>"]).sum())
    assert n_img == int(enc["image_grid_thw"].prod()) // 4 > 1
    with torch.no_grad():
        out = base(**{k: v for k, v in enc.items() if k != "mm_token_type_ids"})
    assert out.logits.shape[-1] == len(tok) and torch.isfinite(out.logits).all()


def test_sam2_pt_has_meta_names_and_rebuilds(fx):
    sd = torch.load(fx.sam2_pt, map_location="cpu", weights_only=True)["model"]
    for name in ("maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "no_obj_ptr"):
        assert name in sd
    for prefix in ("image_encoder.trunk.", "image_encoder.neck.", "sam_prompt_encoder.", "sam_mask_decoder.",
                   "memory_attention.", "memory_encoder.", "obj_ptr_proj.", "mask_downsample."):
        assert any(k.startswith(prefix) for k in sd), prefix
    cfg_json = json.loads(fx.sam2_pt.with_name(fx.sam2_pt.stem + ".config.json").read_text())
    assert cfg_json == fx.sam2_meta_config
    sam2 = build_meta_sam2(cfg_json)
    sam2.load_state_dict(sd, strict=True)
    # only the mask decoder differs from the pretrained SAM2 (it was trained)
    live = fx.meta_sam2.state_dict()
    for k, v in sd.items():
        if k.startswith("sam_mask_decoder."):
            continue
        assert torch.equal(live[k], v), k
    assert any(not torch.equal(live[k], v) for k, v in sd.items() if k.startswith("sam_mask_decoder."))


def test_oracle_is_reproducible_from_disk(fx, ckpt):
    """base folder + iter_N.pth fully determine the in-memory oracle (bit-exact fp32 logits)."""
    from peft import get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(fx.base_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(fx.tokenizer), mean_resizing=False)
    peft_model = get_peft_model(model, _build_lora_config())
    trained = {k[len("mllm.model."):]: v.float() for k, v in ckpt["state_dict"].items() if k.startswith("mllm.model.")}
    missing, unexpected = peft_model.load_state_dict(trained, strict=False)
    assert not unexpected
    peft_model.eval()
    img = (torch.rand(56, 84, 3) * 255).to(torch.uint8).numpy()
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>segment the dog<|im_end|>\n<|im_start|>assistant\nit is [SEG].<|im_end|>"
    enc = fx.processor(text=[text], images=[img], return_tensors="pt")
    assert (enc["input_ids"] == fx.tokenizer.convert_tokens_to_ids("[SEG]")).sum() == 1
    inputs = {k: v for k, v in enc.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        a = peft_model(**inputs, output_hidden_states=True)
        b = fx.peft_model(**inputs, output_hidden_states=True)
        merged = peft_model.merge_and_unload()(**inputs).logits
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.hidden_states[-1], b.hidden_states[-1])
    torch.testing.assert_close(merged, b.logits, rtol=1e-4, atol=1e-4)
    # LoRA matters: disabling the adapter changes the output
    with torch.no_grad(), fx.peft_model.disable_adapter():
        c = fx.peft_model(**inputs).logits
    assert (c - b.logits).abs().max() > 1e-3


@pytest.mark.slow
def test_deepspeed_zero2_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")
    fx = make_sa2va_qwen_fixture(tmp_path, seed=0, deepspeed=True)
    assert not torch.distributed.is_initialized()  # DeepSpeed ran in a subprocess
    assert fx.ds_ckpt.is_dir() and fx.ds_ckpt.name == "iter_2.pth"
    names = sorted(p.name for p in fx.ds_ckpt.iterdir())
    assert names == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"]
    ref = torch.load(fx.ckpt, map_location="cpu", weights_only=False)
    states = torch.load(fx.ds_ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert list(states["module"]) == list(ref["state_dict"])
    assert all(torch.equal(states["module"][k], v) for k, v in ref["state_dict"].items())
    assert states["meta"]["cfg"] == ref["meta"]["cfg"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    fp32 = get_fp32_state_dict_from_zero_checkpoint(
        str(fx.ds_ckpt.parent), tag=fx.ds_ckpt.name, exclude_frozen_parameters=True
    )
    assert set(fp32) == set(ref["state_dict"])
    assert all(torch.equal(fp32[k], v.float()) for k, v in ref["state_dict"].items())
