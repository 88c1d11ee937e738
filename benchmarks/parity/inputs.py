"""The inputs both sides of the parity check use (imported by run_sa2va.py and compare.py)."""

import numpy as np
from PIL import Image

SIZES = [(90, 60), (200, 150), (120, 240), (640, 480)]  # (width, height) of the test images
PROMPT = "<image>Please segment the red box."
TILE, PER_TILE = 56, 4          # the tiny InternViT's tile size and tokens per tile
MAX_NEW_TOKENS, SEG_BIAS = 8, 30.0


def image(i: int, w: int, h: int) -> Image.Image:
    rng = np.random.RandomState(i)
    a = (rng.rand(h, w, 3) * 255).astype(np.uint8)
    a[h // 4: h // 2, w // 3: w // 2] = [220, 30, 30]
    return Image.fromarray(a)
