"""Train the tiny Sa2VA of maskport's demo, in two stages, and write the artifacts maskport ships.

    python examples/tiny-sa2va/train.py --device cuda            # a few minutes on one GPU
    python examples/tiny-sa2va/train.py --device cpu             # under an hour on a laptop-class CPU

Stage 1 ("pre-training", a plain PyTorch loop): a tiny Qwen2.5-VL (transformers), a tiny SAM2 (Meta's
``sam2``) and ``text_hidden_fcs``, all trained end to end on colour prompts ("the red triangle"). The tokenizer
already holds Sa2VA's five tokens ([SEG], <p>, </p>, <vp>, </vp>): this base is a segmentation model, like a
released Sa2VA that one fine-tunes further. Writes

    artifacts/base/                          HF folder (bf16 safetensors, tokenizer, processor)  ~ Qwen2.5-VL-3B-Instruct
    artifacts/sam2/tiny_sam2.pt              Meta format {'model': state_dict} (fp32)           ~ sam2_hiera_large.pt
    artifacts/sam2/tiny_sam2.config.json     Meta's model config (hydra style), read by maskport
    artifacts/stage1_text_hidden_fcs.pth     {'state_dict': text_hidden_fcs.*} (fp32), stage 2's ``pretrained_pth``

Stage 2 ("fine-tuning", Sa2VA's recipe, run by mmengine's Runner): LoRA (r=8, alpha=16, adapter ``default``) on
every linear of the LLM decoder, ``modules_to_save`` embed_tokens/lm_head, the SAM2 mask decoder and
``text_hidden_fcs`` trained; the vision tower and the rest of SAM2 frozen. Task: spatial prompts ("the leftmost
circle") stage 1 never saw, with 25% colour prompts replayed. ``CheckpointHook`` writes

    artifacts/stage2/iter_N.pth              genuine mmengine checkpoint: meta (with cfg), message_hub,
                                             the trainable tensors only, in bf16 (Sa2VA's state_dict override)

plus ``artifacts/heldout/`` (the held-out set, see ``shapes.write_heldout``) and ``artifacts/training.json``
(seed, versions, hardware, times, teacher-forced validation numbers).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import model as M  # noqa: E402
import shapes  # noqa: E402

STAGE1_OFFSET = 0
STAGE2_OFFSET = 50_000_000
VAL_OFFSET = 900_000_000


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_device(data: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in data.items()}


def loader(dataset, batch_size, workers, seed, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
        collate_fn=functools.partial(M.collate, dataset.pad_id), pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, drop_last=True)


@torch.no_grad()
def evaluate(module, tokenizer, device, family: str, n: int, batch_size: int, amp: bool) -> float:
    """Teacher-forced gIoU (the answer fed, the best-IoU mask > 0.5) on ``n`` fresh samples of ``family``."""
    was = module.training
    module.eval()
    ds = M.TaskDataset(tokenizer, {family: 1.0}, n, VAL_OFFSET + (0 if family == "colour" else 10**7), seed=0)
    ious = []
    for batch in loader(ds, batch_size, 0, 0):
        data = to_device(batch["data"], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            _, logits, pred_iou = module.seg_masks(data)
        ious.append(M.best_mask_iou(logits.float(), pred_iou.float(), data["masks"].float()).cpu())
    module.train(was)
    return float(torch.cat(ious).mean())


# ------------------------------------------------------------------------------------------------------------
# stage 1
# ------------------------------------------------------------------------------------------------------------
def stage1(args, out: Path, device, amp: bool) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers import Qwen2VLVideoProcessor

    seed_everything(args.seed)
    tokenizer = M.build_tokenizer()
    n_base = len(tokenizer)
    assert tokenizer.add_tokens(M.SPECIAL_TOKENS, special_tokens=True) == len(M.SPECIAL_TOKENS)
    seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
    hf = Qwen2_5_VLForConditionalGeneration(M.qwen_config(tokenizer)).float()
    sam2_cfg = M.sam2_config()
    sam2 = M.build_meta_sam2(sam2_cfg).float()
    module = M.TinySa2VA(hf, sam2, seg_id, stage=1).to(device).train()
    log(f"stage 1: tokenizer {n_base}+{len(M.SPECIAL_TOKENS)} tokens; LLM+vision {M.count_params(hf) / 1e6:.2f} M, "
        f"SAM2 {M.count_params(sam2) / 1e6:.2f} M, text_hidden_fcs {M.count_params(module.text_hidden_fcs)} params")

    steps, bs = args.stage1_steps, args.batch_size
    ds = M.TaskDataset(tokenizer, {"colour": 1.0}, steps * bs, STAGE1_OFFSET, seed=args.seed)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.stage1_lr, betas=(0.9, 0.999), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, M.lr_lambda(min(300, steps // 10), steps))
    t0 = time.time()
    hist: dict[str, list] = {}
    for step, batch in enumerate(loader(ds, bs, args.workers, args.seed)):
        data = to_device(batch["data"], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = module(data)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for k, v in losses.items():
            hist.setdefault(k, []).append(v.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            for k in hist:  # one device sync per log line
                hist[k] = [float(x) for x in hist[k]]
            avg = {k: round(float(np.mean(v[-args.log_every:])), 4) for k, v in hist.items()}
            log(f"stage 1 step {step + 1}/{steps} {avg} lr {sched.get_last_lr()[0]:.2e} ({time.time() - t0:.0f} s)")
    train_s = time.time() - t0

    # save the base model (bf16, like the hub checkpoints) and Meta's SAM2 checkpoint (fp32)
    module.eval()
    base_dir = out / "base"
    if base_dir.exists():
        shutil.rmtree(base_dir)
    hf_cpu = hf.to("cpu")
    hf_cpu.to(torch.bfloat16).save_pretrained(str(base_dir), safe_serialization=True)
    hf_cpu.float()
    tokenizer.save_pretrained(str(base_dir))
    ip = Qwen2VLImageProcessor(min_pixels=M.MIN_PIXELS, max_pixels=M.MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                               merge_size=2, image_mean=M.CLIP_MEAN, image_std=M.CLIP_STD)
    vp = Qwen2VLVideoProcessor(min_pixels=M.MIN_PIXELS, max_pixels=M.MAX_PIXELS, patch_size=14, temporal_patch_size=2,
                               merge_size=2)
    Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp,
                        chat_template=M.CHAT_TEMPLATE).save_pretrained(str(base_dir))
    ip.save_pretrained(str(base_dir))  # preprocessor_config.json, as in the hub's Qwen2.5-VL folders
    sam_dir = out / "sam2"
    sam_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.detach().cpu().float() for k, v in sam2.state_dict().items()}},
               sam_dir / "tiny_sam2.pt")
    (sam_dir / "tiny_sam2.config.json").write_text(json.dumps(sam2_cfg, indent=2) + "\n")
    torch.save({"state_dict": {f"text_hidden_fcs.{k}": v.detach().cpu().float()
                               for k, v in module.text_hidden_fcs.state_dict().items()}},
               out / "stage1_text_hidden_fcs.pth")
    module.to(device)
    val = {f: evaluate(module, tokenizer, device, f, args.val_samples, bs, amp) for f in ("colour", "new_colour")}
    log(f"stage 1 done in {train_s:.0f} s; teacher-forced val gIoU {val}")
    return {"steps": steps, "batch_size": bs, "lr": args.stage1_lr, "train_seconds": round(train_s, 1),
            "val_giou_teacher_forced": val, "final_losses": {k: float(np.mean(v[-50:])) for k, v in hist.items()}}


# ------------------------------------------------------------------------------------------------------------
# stage 2 (mmengine)
# ------------------------------------------------------------------------------------------------------------
CONFIG_TEMPLATE = '''\
# Stage 2 of maskport's tiny Sa2VA demo: Sa2VA's fine-tuning recipe (xtuner/mmengine style), tiny.
# Rendered by examples/tiny-sa2va/train.py; this text is stored in the checkpoint's meta['cfg'].
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook, LoggerHook,
                            ParamSchedulerHook)
from mmengine.optim import {optim_wrapper_type}, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoTokenizer, Qwen2_5_VLProcessor

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
path = {base!r}
pretrained_pth = {pretrained_pth!r}  # stage 1's text_hidden_fcs
sam2_cfg_path = {sam2_cfg!r}
sam2_ckpt_path = {sam2_pt!r}

# Data
template = 'qwen_chat'
prompt_families = dict(new_colour=0.75, colour=0.25)
max_length = 512
# Qwen2-VL image processor bounds used in training (the images are 128 px, pre-resized to 140 px)
min_pixels = {min_pixels}
max_pixels = {max_pixels}
sam2_image_size = {sam2_size}

# Scheduler & Optimizer
batch_size = {batch_size}  # per_device
accumulative_counts = 1
dataloader_num_workers = {workers}
max_iters = {iters}
optim_type = AdamW
lr = {lr}
betas = (0.9, 0.999)
weight_decay = 0.01
max_norm = 1  # grad clip
warmup_iters = {warmup}

# Save
save_steps = max_iters
save_total_limit = 1

special_tokens = {special_tokens!r}

tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=path,
    trust_remote_code=True,
    padding_side='right')

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model = dict(
    type='TinySa2VA',
    special_tokens=special_tokens,
    pretrained_pth=pretrained_pth,
    frozen_sam2_decoder=False,
    arch_type='qwen',
    mllm=dict(
        type='Qwen2_5_VL',
        model_path=path,
        freeze_llm=True,
        freeze_visual_encoder=True,
        llm_lora=dict(
            type=LoraConfig,
            r={lora_r},
            lora_alpha={lora_alpha},
            lora_dropout=0.0,
            bias='none',
            task_type='CAUSAL_LM',
            modules_to_save=['embed_tokens', 'lm_head'],
            target_modules={lora_target!r}),
    ),
    tokenizer=tokenizer,
    grounding_encoder=dict(type='SAM2TrainRunner', cfg_path=sam2_cfg_path, ckpt_path=sam2_ckpt_path),
    loss_mask=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=2.0),
    loss_dice=dict(type='DiceLoss', loss_weight=0.5),
    loss_iou=dict(type='MSELoss', loss_weight=1.0),
)

preprocessor = dict(
    type=Qwen2_5_VLProcessor.from_pretrained,
    pretrained_model_name_or_path=path,
    min_pixels=min_pixels,
    max_pixels=max_pixels)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type={optim_wrapper_type},{amp_dtype}
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts)

param_scheduler = [
    dict(type=LinearLR, start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type=CosineAnnealingLR, eta_min=0.05 * lr, by_epoch=False, begin=warmup_iters,
         end=max_iters),
]

train_cfg = dict(by_epoch=False, max_iters=max_iters, val_interval=max_iters + 1)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval={log_every}),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        save_optimizer=False,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed={seed}, deterministic=False)
log_processor = dict(by_epoch=False)
'''


def stage2(args, out: Path, device, amp: bool) -> dict:
    from mmengine.config import Config
    from mmengine.runner import Runner
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    seed_everything(args.seed + 1)
    base_dir, sam_pt = out / "base", out / "sam2" / "tiny_sam2.pt"
    sam_cfg_path = out / "sam2" / "tiny_sam2.config.json"
    pretrained_pth = out / "stage1_text_hidden_fcs.pth"
    rel = lambda p: os.path.relpath(p, Path.cwd())  # noqa: E731 - paths as the run saw them, repo-relative
    work = out / "_stage2_work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cfg_text = CONFIG_TEMPLATE.format(
        base=rel(base_dir), pretrained_pth=rel(pretrained_pth), sam2_cfg=rel(sam_cfg_path), sam2_pt=rel(sam_pt),
        min_pixels=M.MIN_PIXELS, max_pixels=M.MAX_PIXELS, sam2_size=M.SAM2_IMAGE_SIZE, batch_size=args.batch_size,
        workers=args.workers, iters=args.stage2_steps, lr=args.stage2_lr, special_tokens=M.SPECIAL_TOKENS,
        lora_r=M.LORA_R, lora_alpha=M.LORA_ALPHA, lora_target=M.LORA_TARGET_REGEX, log_every=args.log_every,
        seed=args.seed, warmup=max(1, args.stage2_steps // 20), optim_wrapper_type="AmpOptimWrapper" if amp else "OptimWrapper",
        amp_dtype="\n    dtype='bfloat16'," if amp else "")
    cfg_path = work / "sa2va_tiny_stage2.py"
    cfg_path.write_text(cfg_text)
    cfg = Config.fromfile(str(cfg_path))

    # Sa2VA's model construction: base MLLM + special tokens + LoRA, SAM2 from Meta's checkpoint,
    # text_hidden_fcs from pretrained_pth
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    added = tokenizer.add_tokens(cfg.special_tokens, special_tokens=True)
    assert added == 0, "the stage-1 base already holds Sa2VA's tokens"
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    hf.resize_token_embeddings(len(tokenizer))
    hf.requires_grad_(False)
    lora = cfg.model.mllm.llm_lora
    peft_model = get_peft_model(hf, LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias=lora.bias,
        task_type=lora.task_type, target_modules=lora.target_modules, modules_to_save=list(lora.modules_to_save)))
    sam2 = M.build_meta_sam2(json.loads(sam_cfg_path.read_text())).float()
    sam2.load_state_dict(torch.load(sam_pt, map_location="cpu", weights_only=True)["model"])
    module = M.TinySa2VA(peft_model, sam2, tokenizer.convert_tokens_to_ids("[SEG]"), stage=2)
    pre = torch.load(pretrained_pth, map_location="cpu", weights_only=True)["state_dict"]
    missing, unexpected = module.load_state_dict(pre, strict=False)
    assert not unexpected and all(not k.startswith("text_hidden_fcs.") for k in missing)
    n_train = M.count_params(module, trainable_only=True)
    log(f"stage 2: {n_train / 1e6:.2f} M trainable of {M.count_params(module) / 1e6:.2f} M")
    # the model before fine-tuning, for the record (teacher-forced)
    module.to(device)
    before = {f: evaluate(module, tokenizer, device, f, args.val_samples, args.batch_size, amp)
              for f in ("new_colour", "colour")}
    log(f"stage 2 start: teacher-forced val gIoU {before}")
    module.cpu()

    ds = M.TaskDataset(tokenizer, dict(cfg.prompt_families), cfg.max_iters * cfg.batch_size, STAGE2_OFFSET,
                       seed=args.seed + 1)
    runner = Runner(
        model=module, work_dir=str(work), experiment_name="stage2",
        train_dataloader=loader(ds, cfg.batch_size, cfg.dataloader_num_workers, args.seed + 1),
        train_cfg=cfg.train_cfg, optim_wrapper=cfg.optim_wrapper, param_scheduler=cfg.param_scheduler,
        default_hooks=cfg.default_hooks, env_cfg=cfg.env_cfg, randomness=cfg.randomness,
        log_processor=cfg.log_processor, log_level=cfg.log_level, cfg=cfg)
    t0 = time.time()
    runner.train()
    train_s = time.time() - t0
    for h in list(runner.logger.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            runner.logger.removeHandler(h)
    ckpt = work / f"iter_{cfg.max_iters}.pth"
    assert ckpt.is_file(), f"mmengine did not write {ckpt}"
    dst = out / "stage2"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy2(ckpt, dst / ckpt.name)
    shutil.copy2(cfg_path, dst / cfg_path.name)
    logs = sorted(work.glob("stage2/*.log"))
    if logs:
        shutil.copy2(logs[-1], dst / "train.log")
    shutil.rmtree(work)

    module.to(device)
    after = {f: evaluate(module, tokenizer, device, f, args.val_samples, args.batch_size, amp)
             for f in ("new_colour", "colour")}
    log(f"stage 2 done in {train_s:.0f} s; teacher-forced val gIoU {after}; checkpoint {dst / ckpt.name}")
    return {"iters": cfg.max_iters, "batch_size": cfg.batch_size, "lr": cfg.lr, "train_seconds": round(train_s, 1),
            "trainable_params": n_train, "val_giou_teacher_forced_before": before,
            "val_giou_teacher_forced_after": after, "checkpoint": f"stage2/{ckpt.name}"}


# ------------------------------------------------------------------------------------------------------------
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "peft", "mmengine", "sam2", "numpy", "pillow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def hardware(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=HERE / "artifacts")
    p.add_argument("--stage", choices=["1", "2", "train", "heldout", "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--stage1-steps", type=int, default=1500)
    p.add_argument("--stage1-lr", type=float, default=1e-3)
    p.add_argument("--sam2-size", type=int, default=M.SAM2_IMAGE_SIZE, help="SAM2 input side (multiple of 32)")
    p.add_argument("--stage2-steps", type=int, default=1000)
    p.add_argument("--stage2-lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 1)))
    p.add_argument("--val-samples", type=int, default=256)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default there: bf16 autocast)")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms (slower)")
    args = p.parse_args(argv)

    M.SAM2_IMAGE_SIZE = args.sam2_size
    device = torch.device(args.device)
    amp = device.type == "cuda" and not args.no_amp
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "training.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if args.stage != "heldout":  # the top-level fields describe the training run; --stage heldout trains nothing
        summary.update({"seed": args.seed, "versions": versions(), "hardware": hardware(device),
                        "amp": "bf16 autocast" if amp else "fp32", "command": " ".join(sys.argv)})
    t0 = time.time()
    if args.stage in ("1", "train", "all"):
        summary["stage1"] = dict(stage1(args, out, device, amp), command=summary["command"],
                                 hardware=summary["hardware"])
    if args.stage in ("2", "train", "all"):
        summary["stage2"] = dict(stage2(args, out, device, amp), command=summary["command"],
                                 hardware=summary["hardware"])
    if args.stage in ("heldout", "all"):
        n = shapes.write_heldout(out / "heldout")
        summary["heldout"] = {"samples": n, "file": "heldout/samples.jsonl", "command": " ".join(sys.argv)}
        log(f"held-out set: {n} samples in {out / 'heldout'}")
    if args.stage != "heldout":
        summary["total_seconds_this_run"] = round(time.time() - t0, 1)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"summary: {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
