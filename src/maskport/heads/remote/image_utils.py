"""Small helpers every maskport export's modeling code uses (images in, device/dtype of a module).

Copied verbatim into export folders (a shared export module: ``maskport/heads/remote/``); it may import only torch,
numpy and PIL.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image; transparent pixels are composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[3])
        return background
    return image.convert("RGB")


def as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise TypeError(f"image must be a PIL.Image (or an HxWx3 uint8 array), got {type(image).__name__}")


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device inputs of ``module`` go to, its parameters' dtype). For a model dispatched by accelerate
    (``device_map=...`` with CPU or disk offload), offloaded parameters sit on the ``meta`` device and are moved in
    by hooks at forward time: the device is then the hooks' execution device, never ``meta``."""
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    for m in module.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return (torch.device("cuda", device) if isinstance(device, int) else torch.device(device)), dtype
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device, dtype
    return torch.device("cpu"), dtype


@contextlib.contextmanager
def onloaded(module: nn.Module):
    """Inside the block, an accelerate-offloaded ``module`` (``device_map`` with CPU or disk offload: parameters on
    ``meta``, each submodule's brought in by its own hook when that submodule's ``forward`` runs) holds all its
    weights, so code that reads parameters directly or calls methods other than ``forward`` works (e.g.
    ``Sam2Model.get_image_embeddings``, a prompt encoder's embeddings); they are offloaded again afterwards. A
    no-op for a module whose weights are all in memory."""
    if not any(p.device.type == "meta" for p in module.parameters()):
        yield module
        return
    hooks = []
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(h, "offload", False):
                hooks.append((m, h))
    for m, h in hooks:
        h.pre_forward(m)
    try:
        yield module
    finally:
        for m, h in reversed(hooks):
            h.post_forward(m, None)


__all__ = ["as_pil", "module_device_dtype", "onloaded", "to_rgb"]
