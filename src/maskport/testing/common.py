"""What every Sa2VA family fixture shares: the tokens Sa2VA adds to the base tokenizer, and the helpers that give
random weights distinctive (perturbed) values and round them the way a bf16 checkpoint stores them."""

from __future__ import annotations

import torch
import torch.nn as nn

SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]


def round_bf16_(module: nn.Module, only_trainable: bool = False) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if only_trainable and not p.requires_grad:
                continue
            p.data = p.data.to(torch.bfloat16).to(torch.float32)


def perturb_(params, gen: torch.Generator, std: float) -> None:
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            p.add_(noise.to(p.dtype))
