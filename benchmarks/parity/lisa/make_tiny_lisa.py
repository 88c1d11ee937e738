"""Build a tiny, briefly trained LISA with LISA's own code and write it as LISA's merge script does.

Runs in LISA's environment (transformers 4.31, see README.md), with a checkout of dvlab-research/LISA:

    python benchmarks/parity/lisa/make_tiny_lisa.py --lisa-repo /path/to/LISA OUT

Writes under OUT:
  clip-vit-tiny-patch14-224/  a tiny CLIP vision tower (CLIPVisionConfig: 224 px, patch 14, so 256 image tokens
                              as LISA's "255" offset hack assumes) + its CLIPImageProcessor config
  base-llava/                 a tiny LLaVA-v1 base folder (LISA's LlavaLlamaForCausalLM class: tiny Llama + one-linear
                              mm_projector) with a slow Llama SentencePiece tokenizer trained here (no hub)
  released/                   the trained model as LISA's merge_lora_weights_and_save_hf_model.py writes it (run as a
                              subprocess from the checkout), then re-saved in .bin shards + index (what save_pretrained
                              of transformers 4.31 writes for a model larger than its shard size, as in the released
                              LISA folders)
  train_log.json              losses and the training set-up

The model is built as LISA's train_ds.py builds it (tokens [SEG], <im_start>, <im_end> added; LISAForCausalLM from the
base folder; vision modules; SAM ViT-H at real size (seeded random init, no SAM checkpoint); LoRA r=8/alpha=16 on
q_proj/v_proj by peft; lm_head, embed_tokens, mask_decoder, text_hidden_fcs trainable), then trained on CPU with LISA's
own forward and losses: first the LLM path alone (LISA's LlavaLlamaForCausalLM forward and its cross-entropy, cheap),
so that greedy decoding answers with [SEG]; then steps of LISA's full model_forward (cross-entropy + mask BCE + dice)
on a few images, so that the mask decoder and text_hidden_fcs learn the boxes (LISA's get_visual_embs, a frozen
encoder under no_grad, is computed once per training image and reused: same values, minutes saved per step).
The peft model's full state dict is written like zero_to_fp32's output and handed to LISA's merge script.
"""

import argparse
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100

# (question, answer) pairs: one [SEG], two [SEG]s, and an answer without [SEG]
TASKS = [
    ("Please segment the red box in this image.", "Sure, [SEG].", ["red"]),
    ("Can you segment the blue box in this image?", "It is [SEG].", ["blue"]),
    ("Please segment the red box and the blue box.", "Sure, [SEG] and [SEG].", ["red", "blue"]),
    ("What is in this image?", "A red box and a blue box.", []),
]

CORPUS_WORDS = """
a chat between curious human and an artificial intelligence assistant the gives helpful detailed polite answers to
human's questions user please segment red blue green box in this image can you it is sure what where which and or
of mask segmentation output respond with explain why reason result here there picture object left right top bottom
""".split()


def train_sentencepiece(out_dir: Path) -> None:
    """A Llama-like SentencePiece BPE (byte fallback, digits split, dummy prefix, <unk>/<s>/</s> = 0/1/2)."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = []
    for _ in range(600):
        n = rng.randint(3, 12)
        words = [rng.choice(CORPUS_WORDS) for _ in range(n)]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", ",", "!", ":", ""]))
    lines += [q + " " + a.replace("[SEG]", "it") for q, a, _ in TASKS] * 5
    lines.append("0 1 2 3 4 5 6 7 8 9 ? ! : ; ' \" ( ) [ ] < > / - _ ASSISTANT: USER:")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False, minloglevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())


def synthetic_image(rng: np.random.RandomState, w: int, h: int):
    """Noise with a red and a blue box; returns (RGB uint8 array, red mask, blue mask)."""
    a = (rng.rand(h, w, 3) * 160).astype(np.uint8)
    masks = {}
    for name, color in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        bw, bh = rng.randint(w // 6, w // 2 + 1), rng.randint(h // 6, h // 2 + 1)
        x0, y0 = rng.randint(0, w - bw + 1), rng.randint(0, h - bh + 1)
        a[y0:y0 + bh, x0:x0 + bw] = color
        m = np.zeros((h, w), np.float32)
        m[y0:y0 + bh, x0:x0 + bw] = 1
        masks[name] = m
    return a, masks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--lisa-repo", type=Path, required=True, help="a checkout of dvlab-research/LISA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-steps", type=int, default=300, help="steps of the LLM path (LISA's LLaVA forward + CE)")
    ap.add_argument("--full-steps", type=int, default=60, help="steps of LISA's full model_forward (CE + BCE + dice)")
    ap.add_argument("--full-images", type=int, default=3, help="training images of those steps (one SAM encoding each)")
    ap.add_argument("--shard-size", default="1GB", help="re-save the merged folder in shards of this size ('' = keep)")
    args = ap.parse_args()

    repo = args.lisa_repo.resolve()
    sys.path.insert(0, str(repo))
    os.chdir(repo)  # LISA's modules import 'utils.utils' and 'model.*' from the checkout's root
    # The only change to running LISA on a machine without CUDA: .cuda() on tensors is the identity (LISA's
    # model_forward builds its [SEG] masks with torch.zeros(...).bool().cuda()).
    torch.Tensor.cuda = lambda self, *a, **k: self

    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaTokenizer

    from chat import preprocess  # LISA's SAM input normalisation + padding
    from model.LISA import LISAForCausalLM
    from model.llava import conversation as conversation_lib
    from model.llava.mm_utils import tokenizer_image_token
    from model.llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from model.segment_anything.utils.transforms import ResizeLongestSide
    from utils.utils import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()

    # ---- tiny CLIP vision tower (name must contain "clip": LISA's build_vision_tower checks it)
    clip_dir = out / "clip-vit-tiny-patch14-224"
    clip_cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                image_size=224, patch_size=14, projection_dim=64)
    CLIPVisionModel(clip_cfg).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(clip_dir)

    # ---- tiny LLaVA-v1 base folder (what --version names in LISA's train_ds.py)
    base = out / "base-llava"
    train_sentencepiece(base)
    tok = LlamaTokenizer(vocab_file=str(base / "tokenizer.model"), legacy=True)
    tok.save_pretrained(base)
    base_cfg = LlavaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        mm_vision_tower=str(clip_dir), mm_hidden_size=64, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="square", tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False, pretrain_mm_mlp_adapter=None, use_mm_proj=True, torch_dtype="float32")
    LlavaLlamaForCausalLM(base_cfg).save_pretrained(base)

    # ---- as LISA's train_ds.py builds the model
    tokenizer = transformers.AutoTokenizer.from_pretrained(base, model_max_length=512, padding_side="right",
                                                           use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.add_tokens("[SEG]")
    seg_token_idx = tokenizer("[SEG]", add_special_tokens=False).input_ids[0]
    tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    model = LISAForCausalLM.from_pretrained(
        base, torch_dtype=torch.float32, low_cpu_mem_usage=True, train_mask_decoder=True, out_dim=256,
        ce_loss_weight=1.0, dice_loss_weight=0.5, bce_loss_weight=2.0, seg_token_idx=seg_token_idx,
        vision_pretrained=None, vision_tower=str(clip_dir), use_mm_start_end=True)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.enable_input_require_grads()
    model.get_model().initialize_vision_modules(model.get_model().config)
    vision_tower = model.get_model().get_vision_tower()
    vision_tower.to(dtype=torch.float32)
    torch.manual_seed(args.seed + 1)
    model.get_model().initialize_lisa_modules(model.get_model().config)  # SAM ViT-H, seeded random init
    for p in vision_tower.parameters():
        p.requires_grad = False
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad = False
    conversation_lib.default_conversation = conversation_lib.conv_templates["llava_v1"]
    skip = ("visual_model", "vision_tower", "mm_projector", "text_hidden_fcs")
    targets = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                     and not any(s in n for s in skip) and any(t in n for t in ("q_proj", "v_proj")))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.05,
                                             bias="none", task_type="CAUSAL_LM"))
    model.resize_token_embeddings(len(tokenizer))
    for n, p in model.named_parameters():
        if any(x in n for x in ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs")):
            p.requires_grad = True

    # ---- training samples (LISA's data format: llava_v1 conversation, <im_start><image><im_end>, answer + </s>)
    clip_proc = CLIPImageProcessor.from_pretrained(clip_dir)
    transform = ResizeLongestSide(1024)

    def sample(i):
        rng = np.random.RandomState(1000 + i)
        w, h = int(rng.randint(64, 400)), int(rng.randint(64, 400))
        img, masks = synthetic_image(rng, w, h)
        q, a, seg_names = TASKS[i % len(TASKS)]
        conv = conversation_lib.conv_templates["llava_v1"].copy()
        conv.messages = []
        prompt = (DEFAULT_IMAGE_TOKEN + "\n" + q).replace(
            DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)
        conv.append_message(conv.roles[0], prompt)
        conv.append_message(conv.roles[1], None)
        instruction = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")
        conv.messages[-1][1] = a
        full = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")
        assert torch.equal(full[: len(instruction)], instruction), "instruction is not a prefix of the conversation"
        labels = full.clone()
        labels[: len(instruction)] = IGNORE_INDEX
        image_clip = clip_proc.preprocess(img, return_tensors="pt")["pixel_values"]
        resized = transform.apply_image(img)
        image = preprocess(torch.from_numpy(resized).permute(2, 0, 1).contiguous()).unsqueeze(0)
        gt = torch.from_numpy(np.stack([masks[n] for n in seg_names]) if seg_names else np.zeros((0, h, w), np.float32))
        return dict(input_ids=full[None], labels=labels[None], attention_masks=torch.ones_like(full[None]).bool(),
                    images_clip=image_clip, images=image, masks_list=[gt], label_list=[torch.zeros(h, w)],
                    resize_list=[resized.shape[:2]], offset=torch.LongTensor([0, 1]), has_seg=bool(seg_names))

    samples = [sample(i) for i in range(32)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()
    log = {"lm_loss": [], "full": []}
    for step in range(args.lm_steps):  # LLM path: LISAForCausalLM.forward with past_key_values -> LLaVA forward + CE
        s = samples[step % len(samples)]
        outp = model(input_ids=s["input_ids"], labels=s["labels"], attention_mask=s["attention_masks"],
                     images=s["images_clip"], past_key_values=None)
        opt.zero_grad()
        outp.loss.backward()
        opt.step()
        log["lm_loss"].append(round(float(outp.loss), 5))
        if step % 50 == 0:
            print(f"lm step {step} ce {float(outp.loss):.4f} ({time.time() - t0:.0f}s)", flush=True)
    seg_samples = [s for s in samples if s["has_seg"]][: args.full_images]
    # LISA's get_visual_embs runs the frozen SAM image encoder under no_grad: its output for a given image never
    # changes during training, so it is computed once per image (by LISA's own method) and reused, which makes
    # many steps of the full forward affordable on a CPU (one ViT-H encoding is minutes on 2 shared cores)
    lisa = model.get_base_model()
    encode, cache = lisa.get_visual_embs, {}

    def get_visual_embs(pixel_values):
        key = (pixel_values.data_ptr(), tuple(pixel_values.shape))
        if key not in cache:
            cache[key] = encode(pixel_values)
        return cache[key]

    lisa.get_visual_embs = get_visual_embs
    for step in range(args.full_steps):  # LISA's full model_forward: CE + mask BCE + dice
        s = seg_samples[step % len(seg_samples)]
        d = model(images=s["images"], images_clip=s["images_clip"], input_ids=s["input_ids"], labels=s["labels"],
                  attention_masks=s["attention_masks"], offset=s["offset"], masks_list=s["masks_list"],
                  label_list=s["label_list"], resize_list=s["resize_list"], inference=False)
        opt.zero_grad()
        d["loss"].backward()
        opt.step()
        row = {k: round(float(v), 5) for k, v in d.items()}
        log["full"].append(row)
        if step % 10 == 0 or step == args.full_steps - 1:
            print(f"full step {step} {row} ({time.time() - t0:.0f}s)", flush=True)
    del lisa.get_visual_embs, cache

    # ---- the peft model's state dict, as zero_to_fp32 writes it; then LISA's merge script
    weight = out / "trained_peft_state_dict.bin"
    torch.save(model.state_dict(), weight)
    del model, opt, params, samples, seg_samples
    released = out / "released"
    cmd = [sys.executable, str(repo / "merge_lora_weights_and_save_hf_model.py"), "--version", str(base),
           "--weight", str(weight), "--save_path", str(released), "--precision", "fp32",
           "--vision-tower", str(clip_dir), "--vis_save_path", str(out / "vis_output")]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=repo)
    weight.unlink()
    if args.shard_size:
        from transformers.modeling_utils import shard_checkpoint

        sd = torch.load(released / "pytorch_model.bin", map_location="cpu")
        shards, index = shard_checkpoint(sd, max_shard_size=args.shard_size, weights_name="pytorch_model.bin")
        for name, part in shards.items():
            torch.save(part, released / name)
        (released / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if "pytorch_model.bin" not in shards:
            (released / "pytorch_model.bin").unlink()
        log["shards"] = sorted(shards)
    log.update(seed=args.seed, lm_steps=args.lm_steps, full_steps=args.full_steps, full_images=args.full_images,
               seg_token_idx=seg_token_idx, vocab=len(tokenizer), seconds=round(time.time() - t0, 1),
               versions={"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": __import__("peft").__version__, "numpy": np.__version__})
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"done in {time.time() - t0:.0f}s: {released}")


if __name__ == "__main__":
    main()
