"""The naive baseline: what Sa2VA's official converter (``tools/convert_to_hf.py``) does, on maskport's inputs.

    python benchmarks/convert/baseline.py CKPT --base BASE --sam2 SAM2_PT -o OUT

Like the official converter it builds the whole training model in float32 RAM and merges there:

1. the base ``Qwen2_5_VLForConditionalGeneration`` in float32, its embeddings resized to the tokenizer plus
   Sa2VA's 5 special tokens, wrapped with peft's ``get_peft_model`` (the run's LoRA config: r, alpha, every LLM
   linear, ``modules_to_save`` embed_tokens/lm_head);
2. Meta's SAM2 (``sam2.1_hiera_l.yaml``, float32) with the ``.pt`` weights, and ``text_hidden_fcs``;
3. the training checkpoint loaded whole (``torch.load``) into that module with ``strict=False``;
4. peft's ``merge_and_unload``, a cast to bfloat16, ``save_pretrained`` of the MLLM and a safetensors file of
   SAM2 + ``text_hidden_fcs``.

The official script additionally builds its HF ``Sa2VAChatModel`` in bf16 next to the fp32 one and copies the
state dict over before saving; this baseline skips that second copy, so it needs *less* memory than the official
converter. It does no SAM2 key renaming (no layout conversion): only the memory/time-dominant work.

``--dtype bfloat16`` runs the same steps with the model built in bf16 (peft still computes each LoRA delta in
float32 on the CPU). That is *not* what the official converter does (it rounds the merged weights differently),
but it fits in less memory and does strictly less work, so its time is a lower bound for the float32 baseline's
on a machine where that one runs out of memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402


def log(msg: str, t0: float) -> None:
    with open("/proc/self/status") as f:
        rss = next((line.split()[1] for line in f if line.startswith("VmRSS")), "?")
    print(f"[baseline {time.time() - t0:7.1f} s, RSS {int(rss) / (1 << 20):5.1f} GiB] {msg}", flush=True)


def build_meta_sam2_large():
    import hydra.utils
    import omegaconf
    import sam2

    path = os.path.join(os.path.dirname(sam2.__file__), "configs", "sam2.1", "sam2.1_hiera_l.yaml")
    cfg = omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.load(path), resolve=True)["model"]
    return hydra.utils.instantiate(cfg, _recursive_=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--sam2", type=Path, required=True)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    t0 = time.time()

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    tokenizer.add_tokens(shapes.SA2VA_SPECIAL_TOKENS, special_tokens=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.base, dtype=dtype)
    log(f"base model loaded in {args.dtype}", t0)
    model.resize_token_embeddings(len(tokenizer))  # as Sa2VA does (shrinks the padded hub vocabulary)
    model.requires_grad_(False)
    lora = LoraConfig(r=shapes.LORA_R, lora_alpha=shapes.LORA_ALPHA, lora_dropout=0.05, bias="none",
                      task_type="CAUSAL_LM", target_modules=shapes.LORA_TARGET_REGEX,
                      modules_to_save=["embed_tokens", "lm_head"])
    peft_model = get_peft_model(model, lora)
    log("peft model built", t0)

    sam2 = build_meta_sam2_large()
    sam2.load_state_dict(torch.load(args.sam2, map_location="cpu", weights_only=True)["model"])
    sam2.to(dtype)
    hidden = model.config.text_config.hidden_size

    class Holder(nn.Module):
        def __init__(self, **mods):
            super().__init__()
            for k, v in mods.items():
                setattr(self, k, v)

    module = Holder(mllm=Holder(model=peft_model), grounding_encoder=Holder(sam2_model=sam2),
                    text_hidden_fcs=nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                                  nn.Linear(hidden, 256), nn.Dropout(0.0))).to(dtype)
    log("SAM2 + text_hidden_fcs built", t0)

    state = torch.load(args.ckpt, map_location="cpu", weights_only=False)["state_dict"]
    log("training checkpoint loaded", t0)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise SystemExit(f"unexpected keys: {unexpected[:5]}")
    del state
    log("state dict loaded (strict=False)", t0)

    merged = peft_model.merge_and_unload()
    module.mllm.model = merged
    log("LoRA merged (merge_and_unload)", t0)
    module.to(torch.bfloat16)
    log("cast to bfloat16", t0)

    args.out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(args.out / "mllm", safe_serialization=True)
    tokenizer.save_pretrained(args.out / "mllm")
    rest = {f"sam2.{k}": v.contiguous() for k, v in sam2.state_dict().items()}
    rest.update({f"text_hidden_fcs.{k}": v.contiguous() for k, v in module.text_hidden_fcs.state_dict().items()})
    save_file(rest, str(args.out / "sam2_and_text_hidden_fcs.safetensors"))
    log("saved", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
