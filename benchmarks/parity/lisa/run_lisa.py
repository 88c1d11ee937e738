"""Run LISA's own inference (as its chat.py does it) on the parity inputs and save what it answers.

Runs in LISA's environment (transformers 4.31, see README.md) with a checkout of dvlab-research/LISA:

    python benchmarks/parity/lisa/run_lisa.py --lisa-repo /path/to/LISA RELEASED_FOLDER CLIP_FOLDER OUT_DIR

The steps are chat.py's, with --precision fp32 and --conv_type llava_v1 (its defaults otherwise: use_mm_start_end,
image_size 1024, model_max_length 512): the slow Llama tokenizer, LISAForCausalLM.from_pretrained(..., vision_tower=
CLIP_FOLDER), initialize_vision_modules, CLIPImageProcessor of the vision tower, ResizeLongestSide(1024), chat.py's own
preprocess(), tokenizer_image_token, LISAForCausalLM.evaluate(), logits > 0. Images are written as PNG and read back
with cv2 as chat.py reads them. Adaptations to a machine without CUDA (nothing else): torch.Tensor.cuda is the
identity, and the model stays on the CPU (chat.py's .cuda() / .to(device=local_rank)). max_new_tokens is inputs.py's
MAX_NEW_TOKENS (chat.py: 512; the tiny model ends its answers with </s> well before).

Read-only forward hooks record what LISA feeds SAM (the [SEG] embeddings given to the prompt encoder, the image
embeddings, the decoder's low-res mask logits) and LISA's LLM logits over the answer are computed afterwards with the
same model's forward (LlavaLlamaForCausalLM.forward on the generated sequence), for diagnosis and the logit comparison.

Writes OUT_DIR/image{i}.png and OUT_DIR/lisa.npz.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inputs import CASES, MAX_NEW_TOKENS, image_array  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("released", type=Path)
    ap.add_argument("clip", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--lisa-repo", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    released, clip, out = args.released.resolve(), args.clip.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    repo = args.lisa_repo.resolve()
    sys.path.insert(0, str(repo))
    os.chdir(repo)
    torch.Tensor.cuda = lambda self, *a, **k: self  # no CUDA here: LISA's evaluate() builds masks with .cuda()

    import cv2
    import transformers
    from transformers import AutoTokenizer, CLIPImageProcessor

    from chat import preprocess
    from model.LISA import LISAForCausalLM
    from model.llava import conversation as conversation_lib
    from model.llava.mm_utils import tokenizer_image_token
    from model.segment_anything.utils.transforms import ResizeLongestSide
    from utils.utils import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(str(released), cache_dir=None, model_max_length=512,
                                              padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    seg_token_idx = tokenizer("[SEG]", add_special_tokens=False).input_ids[0]
    torch_dtype = torch.float32
    model = LISAForCausalLM.from_pretrained(str(released), low_cpu_mem_usage=True, vision_tower=str(clip),
                                            seg_token_idx=seg_token_idx, torch_dtype=torch_dtype)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.get_model().initialize_vision_modules(model.get_model().config)
    vision_tower = model.get_model().get_vision_tower()
    vision_tower.to(dtype=torch_dtype)
    model = model.float()  # chat.py, --precision fp32: model.float().cuda()
    clip_image_processor = CLIPImageProcessor.from_pretrained(model.config.vision_tower)
    transform = ResizeLongestSide(1024)
    model.eval()
    print(f"loaded in {time.time() - t0:.0f}s; seg_token_idx {seg_token_idx}", flush=True)

    rec = {}
    vm = model.model.visual_model
    vm.prompt_encoder.register_forward_hook(
        lambda m, a, kw, o: rec.setdefault("text_embeds", []).append(kw["text_embeds"].detach().clone()),
        with_kwargs=True)
    vm.mask_decoder.register_forward_hook(lambda m, a, o: rec.setdefault("low_res", []).append(o[0].detach().clone()))
    vm.image_encoder.register_forward_hook(lambda m, a, o: rec.setdefault("image_emb", []).append(o.detach().clone()))

    saved, meta = {}, []
    for i, (w, h, question) in enumerate(CASES):
        rec.clear()
        path = out / f"image{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image_array(i), cv2.COLOR_RGB2BGR))
        t1 = time.time()
        # ---- chat.py's loop body
        conv = conversation_lib.conv_templates["llava_v1"].copy()
        conv.messages = []
        prompt = DEFAULT_IMAGE_TOKEN + "\n" + question
        replace_token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        prompt = prompt.replace(DEFAULT_IMAGE_TOKEN, replace_token)
        conv.append_message(conv.roles[0], prompt)
        conv.append_message(conv.roles[1], "")
        prompt = conv.get_prompt()
        image_np = cv2.imread(str(path))
        image_np = cv2.cvtColor(image_np, cv2.COLOR_BGR2RGB)
        assert np.array_equal(image_np, image_array(i))
        original_size_list = [image_np.shape[:2]]
        image_clip = clip_image_processor.preprocess(image_np, return_tensors="pt")["pixel_values"][0].unsqueeze(0)
        image_clip = image_clip.float()
        image = transform.apply_image(image_np)
        resize_list = [image.shape[:2]]
        image = preprocess(torch.from_numpy(image).permute(2, 0, 1).contiguous()).unsqueeze(0)
        image = image.float()
        input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
        input_ids = input_ids.unsqueeze(0)
        output_ids, pred_masks = model.evaluate(image_clip, image, input_ids, resize_list, original_size_list,
                                                max_new_tokens=MAX_NEW_TOKENS, tokenizer=tokenizer)
        full_ids = output_ids[0]
        output_ids = output_ids[0][output_ids[0] != IMAGE_TOKEN_INDEX]
        text_output = tokenizer.decode(output_ids, skip_special_tokens=False)
        text_output = text_output.replace("\n", "").replace("  ", " ")
        # ---- chat.py saves pred_mask > 0 of the first [SEG] only; all of them are kept here
        logits = pred_masks[0].detach().float().numpy()  # (n_seg, H, W) mask logits at the input size
        gen = full_ids[input_ids.shape[1]:]
        answer = tokenizer.decode(gen, skip_special_tokens=False)
        # LISA's LLM logits for the answer positions: the same model's forward over the generated sequence
        with torch.no_grad():
            o = model(input_ids=full_ids[None], images=image_clip, attention_mask=torch.ones_like(full_ids[None]),
                      past_key_values=None)
        n_img = 255  # 256 image features replace the one IMAGE_TOKEN_INDEX
        start = input_ids.shape[1] - 1 + n_img
        llm_logits = o.logits[0, start: start + len(gen)].float().numpy()
        assert np.array_equal(llm_logits.argmax(-1)[: len(gen)], gen.numpy()), "forward does not reproduce greedy"
        saved[f"input_ids{i}"] = input_ids[0].numpy()
        saved[f"gen_ids{i}"] = gen.numpy()
        saved[f"llm_logits{i}"] = llm_logits
        saved[f"mask_logits{i}"] = logits
        saved[f"masks{i}"] = logits > 0
        saved[f"low_res{i}"] = (torch.cat(rec["low_res"], 0).numpy() if rec.get("low_res")
                                else np.zeros((0, 1, 256, 256), np.float32))
        saved[f"seg_embeds{i}"] = (torch.cat(rec["text_embeds"], 0)[:, 0].numpy() if rec.get("text_embeds")
                                   else np.zeros((0, 256), np.float32))
        saved[f"image_emb{i}"] = rec["image_emb"][0].numpy()
        saved[f"clip_pixels{i}"] = image_clip[0].numpy()
        saved[f"sam_pixels{i}"] = image[0].numpy()
        row = {"image": [w, h], "question": question, "text_output": text_output, "answer": answer,
               "gen_ids": gen.tolist(), "n_masks": int(logits.shape[0]),
               "mask_fraction_positive": [round(float((m > 0).mean()), 4) for m in logits],
               "resize": list(resize_list[0]), "seconds": round(time.time() - t1, 1)}
        meta.append(row)
        print(json.dumps(row), flush=True)
    saved["meta"] = np.array(json.dumps({"cases": meta, "seg_token_idx": seg_token_idx, "versions": {
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "opencv": cv2.__version__}}))
    np.savez_compressed(out / "lisa.npz", **saved)
    print(f"done in {time.time() - t0:.0f}s -> {out / 'lisa.npz'}")


if __name__ == "__main__":
    main()
