"""Write realistic Sa2VA-Qwen2.5-VL conversion inputs at real shapes, with random values, straight to disk.

    python benchmarks/convert/generate.py --size 3b --out /tmp/maskport-bench
    python benchmarks/convert/generate.py --size 7b --out /tmp/maskport-bench   # skipped if the disk is short

Writes ``<out>/<size>/``:

- ``base/``: a Qwen2.5-VL-{3B,7B}-Instruct-shaped folder: ``config.json`` (transformers' ``Qwen2_5_VLConfig`` with
  the hub values), sharded bf16 safetensors under transformers' on-disk names (the 3B base ties its embeddings
  and has no ``lm_head.weight``, like the hub one), a byte-level BPE tokenizer with exactly Qwen's 151665 tokens
  (151643 BPE ids + 22 added tokens, so Sa2VA's 5 special tokens make the 151670 trained embedding rows), the
  Qwen2.5-VL processor files and ``generation_config.json``. Safetensors are written header first, then each
  tensor's bytes streamed from a random pool in chunks: the folder is never held in RAM.
- ``sam2_hiera_large.pt``: ``{'model': state_dict}`` with the exact keys/shapes of Meta's ``sam2.1_hiera_l.yaml``
  model (fp32), so maskport detects the ``sam2.1_hiera_large`` preset.
- ``work_dirs/iter_40000.pth``: an mmengine checkpoint (``meta`` with the pretty-printed training config, r=128,
  lora_alpha=256; ``message_hub`` with real mmengine ``HistoryBuffer`` objects; ``param_schedulers``) whose
  ``state_dict`` is what Sa2VA saves: LoRA A/B of every LLM linear, ``modules_to_save`` embed_tokens/lm_head,
  SAM2's mask decoder and ``text_hidden_fcs``, in bf16. ``torch.save`` needs these tensors in memory (1.7 GB at
  3B, 2.9 GB at 7B); only this generator holds them, never the conversion being measured.

Values: normal(0, 0.02) (norm weights around 1) drawn into a 64 MiB pool per dtype and written at rotating
offsets, so the numbers are finite, normal floats (no NaN/denormal slow paths), but tensors are not independent
draws (a fresh draw per byte would make generation CPU-bound and does not change the conversion's work).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2] / "src"))  # maskport.testing, also when not installed
import shapes  # noqa: E402

ST_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
POOL_BYTES = 64 << 20
SHARD_BYTES = 4 * 10**9  # the hub's Qwen2.5-VL shards are ~4 GB


class Pool:
    """64 MiB of random normal values per dtype, handed out at rotating offsets."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.pools: dict[torch.dtype, torch.Tensor] = {}
        self.pos = 0

    def _pool(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.pools:
            n = POOL_BYTES // torch.empty((), dtype=dtype).element_size()
            self.pools[dtype] = (torch.randn(n, generator=self.gen) * 0.02).to(dtype)
        return self.pools[dtype]

    def chunks(self, dtype: torch.dtype, numel: int, *, ones: bool = False):
        """Yield 1-D tensors (views of the pool) whose concatenation has ``numel`` elements."""
        pool = self._pool(dtype)
        n = pool.numel()
        self.pos = (self.pos + 7919 * 64) % n
        start, left = self.pos, numel
        while left:
            take = min(left, n - start)
            piece = pool[start:start + take]
            yield piece + 1 if ones else piece
            left -= take
            start = 0

    def tensor(self, dtype: torch.dtype, shape, *, ones: bool = False) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        flat, off = t.view(-1), 0
        for c in self.chunks(dtype, t.numel(), ones=ones):
            flat[off:off + c.numel()] = c
            off += c.numel()
        return t


def _is_norm_weight(name: str, shape) -> bool:
    return len(shape) == 1 and name.endswith(".weight")


def write_safetensors(path: Path, specs: list[shapes.Spec], pool: Pool, metadata: dict | None = None) -> int:
    """Header first, then each tensor's bytes in pool-sized chunks. Returns the file size."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for s in specs:
        header[s.name] = {"dtype": ST_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for s in specs:
            numel = s.nbytes // torch.empty((), dtype=s.dtype).element_size()
            for c in pool.chunks(s.dtype, numel, ones=_is_norm_weight(s.name, s.shape)):
                f.write(memoryview(c.view(torch.uint8).numpy()))
    return path.stat().st_size


def write_base(base_dir: Path, size: str | dict, pool: Pool, *, tokenizer: str = "qwen") -> None:
    """The base folder; ``tokenizer="tiny"`` uses the test factory's ~460-token tokenizer instead of a
    151665-token one (for small test sets)."""
    base_dir.mkdir(parents=True, exist_ok=True)
    specs = shapes.base_specs(size)
    shards: list[list[shapes.Spec]] = [[]]
    cur = 0
    for s in specs:
        if shards[-1] and cur + s.nbytes > SHARD_BYTES:
            shards.append([])
            cur = 0
        shards[-1].append(s)
        cur += s.nbytes
    weight_map = {}
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(base_dir / name, group, pool)
        weight_map.update({s.name: name for s in group})
    index = {"metadata": {"total_size": shapes.total_bytes(specs)}, "weight_map": dict(sorted(weight_map.items()))}
    (base_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = shapes.qwen_config(size)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(base_dir)
    if tokenizer == "tiny":
        from maskport.testing.sa2va_qwen2_5_vl import make_qwen_processor, make_tiny_tokenizer

        make_qwen_processor(make_tiny_tokenizer(base_dir)).save_pretrained(str(base_dir))
    else:
        write_tokenizer_and_processor(base_dir)


def write_tokenizer_and_processor(base_dir: Path) -> None:
    """A byte-level BPE with exactly Qwen2.5's 151665 tokens (its filler tokens are unreachable by merges: the
    tokenizer works, its size is what matters here), Qwen's chat template, the Qwen2.5-VL processor files."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    from maskport.testing.tokenizers import QWEN_CHAT_TEMPLATE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    i = len(vocab)
    while len(vocab) < shapes.QWEN_BPE_SIZE:
        vocab[f"\u0120tok{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in shapes.QWEN_ADDED_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token=None, model_max_length=131072,
                                 padding_side="right", chat_template=QWEN_CHAT_TEMPLATE)
    assert len(hf) == shapes.QWEN_BPE_SIZE + len(shapes.QWEN_ADDED_TOKENS) == shapes.SA2VA_VOCAB - 5, len(hf)
    assert hf.convert_tokens_to_ids("<|image_pad|>") == 151655
    kw = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2)
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=hf,
                               video_processor=Qwen2VLVideoProcessor(**kw), chat_template=QWEN_CHAT_TEMPLATE)
    proc.save_pretrained(str(base_dir))
    GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=True,
                     temperature=1e-6, top_k=1, top_p=0.001, repetition_penalty=1.05).save_pretrained(base_dir)


def write_sam2(path: Path, pool: Pool, specs: list[shapes.Spec]) -> None:
    sd = {s.name: pool.tensor(s.dtype, s.shape, ones=_is_norm_weight(s.name, s.shape)) for s in specs}
    torch.save({"model": sd}, path)


def training_config_text(size: str | dict, base_dir: Path, sam2_pt: Path) -> str:
    """mmengine's ``Config.pretty_text`` of a Sa2VA-Qwen2.5-VL stage config (as ``meta['cfg']`` holds it)."""
    from mmengine.config import Config

    e = shapes._entry(size)
    r, alpha = e.get("lora_r", shapes.LORA_R), e.get("lora_alpha", shapes.LORA_ALPHA)
    cfg = dict(
        path=str(base_dir), template="qwen_chat", max_length=8192, batch_size=2, accumulative_counts=4,
        lr=4e-5, max_iters=40000, special_tokens=shapes.SA2VA_SPECIAL_TOKENS,
        tokenizer=dict(type="transformers.AutoTokenizer.from_pretrained", pretrained_model_name_or_path=str(base_dir),
                       trust_remote_code=True, padding_side="right"),
        model=dict(
            type="projects.sa2va.models.Sa2VAModel", special_tokens=shapes.SA2VA_SPECIAL_TOKENS,
            frozen_sam2_decoder=False, arch_type="qwen", pretrained_pth=None,
            mllm=dict(type="projects.sa2va.models.mllm.qwenvl.Qwen2_5_VL", model_path=str(base_dir),
                      freeze_llm=True, freeze_visual_encoder=True,
                      llm_lora=dict(type="peft.LoraConfig", r=r, lora_alpha=alpha,
                                    lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                    target_modules=shapes.LORA_TARGET_REGEX,
                                    modules_to_save=["embed_tokens", "lm_head"])),
            grounding_encoder=dict(type="projects.sa2va.models.SAM2TrainRunner", ckpt_path=str(sam2_pt)),
            loss_mask=dict(type="third_parts.mmdet.models.losses.CrossEntropyLoss", use_sigmoid=True,
                           reduction="mean", loss_weight=2.0),
            loss_dice=dict(type="third_parts.mmdet.models.losses.DiceLoss", use_sigmoid=True, activate=True,
                           reduction="mean", naive_dice=True, eps=1.0, loss_weight=0.5)),
        optim_wrapper=dict(type="mmengine._strategy.deepspeed.DeepSpeedOptimWrapper",
                           optimizer=dict(type="torch.optim.AdamW", lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05)),
        param_scheduler=[dict(type="mmengine.optim.LinearLR", start_factor=1e-5, by_epoch=False, begin=0, end=1200),
                         dict(type="mmengine.optim.CosineAnnealingLR", eta_min=0.0, by_epoch=False, begin=1200,
                              end=40000)],
        train_cfg=dict(type="xtuner.engine.runner.TrainLoop", max_iters=40000),
        default_hooks=dict(checkpoint=dict(type="mmengine.hooks.CheckpointHook", by_epoch=False, interval=2000,
                                           max_keep_ckpts=2)),
        randomness=dict(seed=None, deterministic=False),
    )
    return Config(cfg).pretty_text


def write_ckpt(path: Path, size: str | dict, base_dir: Path, sam2_pt: Path, pool: Pool,
               sam2_specs: list[shapes.Spec]) -> None:
    import numpy as np
    from mmengine.logging import MessageHub

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {}
    for s in shapes.ckpt_specs(size, sam2_specs):
        sd[s.name] = pool.tensor(s.dtype, s.shape, ones=_is_norm_weight(s.name, s.shape))
    text = training_config_text(size, base_dir, sam2_pt)
    hub = MessageHub.get_instance(f"maskport-bench-{os.getpid()}-{path.parent.parent.name}")
    for i in range(20):
        for k in ("loss", "llm_loss", "loss_mask", "loss_dice"):
            hub.update_scalar(f"train/{k}", 1.0 / (i + 1))
        hub.update_scalar("train/lr", 4e-5)
    hub.update_info("iter", 40000)
    hub.update_info("eta", np.float64(0.0))
    ckpt = {
        "meta": {"epoch": 0, "iter": 40000, "cfg": text, "seed": 42,
                 "experiment_name": "sa2va_qwen25vl", "time": "20250101_000000",
                 "mmengine_version": "0.10.7"},
        "state_dict": sd,
        "message_hub": hub.state_dict(),
        "param_schedulers": [{"start_factor": 1e-5, "end_factor": 1.0, "total_iters": 1200, "param_name": "lr",
                              "begin": 0, "end": 1200, "by_epoch": False, "base_values": [4e-5],
                              "last_step": 40000, "_global_step": 40000, "verbose": False,
                              "_last_value": [0.0]}],
    }
    torch.save(ckpt, path)


def input_bytes(size: str) -> int:
    s2 = shapes.sam2_specs()
    return shapes.total_bytes(shapes.base_specs(size)) + shapes.total_bytes(s2) + shapes.total_bytes(
        shapes.ckpt_specs(size, s2))


def needed_bytes(size: str) -> int:
    """Inputs, plus room for the runner's outputs (it keeps one export, or one copy, at a time), +10 %."""
    out = shapes.total_bytes(shapes.base_specs(size))
    return int(1.1 * (input_bytes(size) + out))


def generate(size: str, root: Path, *, force: bool = False, seed: int = 0) -> Path | None:
    d = root / size
    done = d / "GENERATED.json"
    if done.is_file() and not force:
        print(f"[{size}] already generated in {d}")
        return d
    free = shutil.disk_usage(root).free
    need = needed_bytes(size)
    if free < need:
        print(f"[{size}] SKIPPED: {free / 1e9:.1f} GB free on {root}, {need / 1e9:.1f} GB needed "
              f"(inputs {input_bytes(size) / 1e9:.1f} GB + room for the runner's outputs)")
        return None
    generate_set(d, size, seed=seed, log=lambda msg: print(f"[{size}] {msg}"))
    return d


def generate_set(d: Path, size: str | dict, *, sam2_model_cfg: dict | None = None, tokenizer: str = "qwen",
                 seed: int = 0, log=lambda msg: None) -> dict[str, Path]:
    """Write one input set into ``d`` (replacing it): ``base/``, the SAM2 ``.pt`` and ``work_dirs/iter_40000.pth``.

    ``size``: a ``shapes.SIZES`` name or a custom entry (see ``shapes._entry``). ``sam2_model_cfg``: a hydra-style
    Meta SAM2 model config for a non-official SAM2, written as ``sam2.pt`` with its ``sam2.config.json`` beside it;
    default: ``sam2_hiera_large.pt`` at the official shapes."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    pool = Pool(seed)
    t0 = time.time()
    sam2_name = "sam2_hiera_large.pt" if sam2_model_cfg is None else "sam2.pt"
    base_dir, sam2_pt, ckpt = d / "base", d / sam2_name, d / "work_dirs" / "iter_40000.pth"
    write_base(base_dir, size, pool, tokenizer=tokenizer)
    log(f"base folder written ({time.time() - t0:.0f} s)")
    sam2_specs = shapes.sam2_specs(sam2_model_cfg)
    write_sam2(sam2_pt, pool, sam2_specs)
    if sam2_model_cfg is not None:
        sam2_pt.with_suffix(".config.json").write_text(json.dumps({"model": sam2_model_cfg}, indent=1))
    log(f"SAM2 written ({time.time() - t0:.0f} s)")
    write_ckpt(ckpt, size, base_dir, sam2_pt, pool, sam2_specs)
    log(f"training checkpoint written ({time.time() - t0:.0f} s)")
    sizes = {"base": sum(p.stat().st_size for p in base_dir.glob("*.safetensors")),
             "sam2": sam2_pt.stat().st_size, "ckpt": ckpt.stat().st_size}
    (d / "GENERATED.json").write_text(json.dumps({"size": size if isinstance(size, str) else "custom",
                                                  "bytes": sizes, "seconds": round(time.time() - t0, 1)}, indent=2))
    log(f"done in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sizes.items()))
    return {"base": base_dir, "sam2": sam2_pt, "ckpt": ckpt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["3b", "7b"], action="append", help="repeatable; default: 3b and 7b")
    ap.add_argument("--out", type=Path, default=Path("/tmp/maskport-bench"))
    ap.add_argument("--force", action="store_true", help="regenerate even if present")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for size in args.size or ["3b", "7b"]:
        generate(size, args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
