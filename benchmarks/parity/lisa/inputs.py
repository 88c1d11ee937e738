"""The inputs both sides of the LISA parity check use (imported by run_lisa.py in LISA's environment and by
compare.py in maskport's): numpy + PIL only."""

import numpy as np
from PIL import Image

# (width, height, question): various sizes and aspect ratios (wide, tall, tiny, square); one [SEG], two [SEG]s and an
# answer without [SEG] (the questions the tiny model was trained on, see make_tiny_lisa.py)
CASES = [
    (640, 480, "Please segment the red box in this image."),
    (300, 500, "Can you segment the blue box in this image?"),
    (1024, 200, "Please segment the red box and the blue box."),
    (77, 123, "Please segment the red box in this image."),
    (500, 500, "What is in this image?"),
]
MAX_NEW_TOKENS = 32


def image_array(i: int) -> np.ndarray:
    """RGB uint8 (H, W, 3): seeded noise with a red and a blue box."""
    w, h, _ = CASES[i]
    rng = np.random.RandomState(100 + i)
    a = (rng.rand(h, w, 3) * 160).astype(np.uint8)
    for color in ((220, 30, 30), (30, 40, 220)):
        bw, bh = rng.randint(max(1, w // 6), w // 2 + 1), rng.randint(max(1, h // 6), h // 2 + 1)
        x0, y0 = rng.randint(0, w - bw + 1), rng.randint(0, h - bh + 1)
        a[y0:y0 + bh, x0:x0 + bw] = color
    return a


def image(i: int) -> Image.Image:
    return Image.fromarray(image_array(i))
