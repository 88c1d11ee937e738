"""The synthetic referring-segmentation task of the tiny Sa2VA demo.

Each sample is a 128x128 RGB image on a noisy grey background holding 2-5 flat shapes (circle, square,
triangle) in a few colours, a prompt that names exactly one of them, the answer ``"Sure, [SEG]."`` and the
ground-truth mask of that shape (the pixels PIL painted for it).

Two prompt families:

- ``colour`` (stage 1, "pre-training"): ``"<image>Please segment the red triangle."`` -- colour + kind; the scene
  always holds distractors of the same colour or the same kind, so both words matter;
- ``spatial`` (stage 2, "fine-tuning"): ``"<image>Please segment the leftmost circle."`` (leftmost / rightmost /
  topmost / bottommost) -- the scene holds 2-3 shapes of the named kind, often of the same colour, so colour
  cannot tell them apart: only where they are does. Stage 1 never sees these words.

Everything is a pure function of an integer seed: ``make_sample(seed, family)`` always returns the same
image, prompt and mask (numpy's PCG64 generator and PIL's drawing are deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
KINDS = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB centre (each pixel colour is jittered around it per shape)
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 215),
    "yellow": (225, 205, 40),
}
DIRECTIONS = ("leftmost", "rightmost", "topmost", "bottommost")
ANSWER = "Sure, [SEG]."

COLOUR_TEMPLATES = (
    "<image>Please segment the {colour} {kind}.",
    "<image>Segment the {colour} {kind} in this image.",
    "<image>Can you segment the {colour} {kind}?",
)
SPATIAL_TEMPLATES = (
    "<image>Please segment the {direction} {kind}.",
    "<image>Segment the {direction} {kind} in this image.",
    "<image>Can you segment the {direction} {kind}?",
)

# every word a prompt or answer can use (the tiny tokenizer is trained on these, see model.py)
VOCABULARY_TEXT = " ".join(
    [t.format(colour=c, kind=k, direction=d).replace("<image>", "")
     for t in COLOUR_TEMPLATES + SPATIAL_TEMPLATES for c in COLOURS for k in KINDS for d in DIRECTIONS][:40]
    + list(COLOURS) + list(KINDS) + list(DIRECTIONS) + [ANSWER]
)


@dataclass
class Shape:
    kind: str
    colour: str
    cx: float
    cy: float
    r: float  # half the side of the bounding box


@dataclass
class Sample:
    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    mask: np.ndarray  # bool (H, W), the target shape
    prompt: str
    answer: str
    family: str  # "colour" | "spatial"
    target: Shape
    shapes: list


def _polygon(shape: Shape) -> list[tuple[float, float]] | None:
    x, y, r = shape.cx, shape.cy, shape.r
    if shape.kind == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape.kind == "triangle":  # pointing up, inside the bounding box
        return [(x, y - r), (x + r, y + r * 0.85), (x - r, y + r * 0.85)]
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    poly = _polygon(shape)
    if poly is None:
        draw.ellipse([shape.cx - shape.r, shape.cy - shape.r, shape.cx + shape.r, shape.cy + shape.r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def shape_mask(shape: Shape, size: int = IMAGE_SIZE) -> np.ndarray:
    m = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(m), shape, 255)
    return np.asarray(m) > 0


def render(shapes: list[Shape], rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    grey = int(rng.integers(90, 170))
    bg = np.full((size, size, 3), grey, dtype=np.float32)
    bg += rng.normal(0.0, 6.0, size=(size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s in shapes:
        base = np.array(COLOURS[s.colour], dtype=np.float32)
        col = np.clip(base + rng.normal(0.0, 12.0, size=3), 0, 255).astype(int)
        _draw(draw, s, tuple(int(c) for c in col))
    return img


def _place(rng: np.random.Generator, specs: list[tuple[str, str]], size: int = IMAGE_SIZE,
           rmin: float = 9.0, rmax: float = 20.0, tries: int = 200) -> list[Shape] | None:
    """Non-overlapping placement (bounding circles with a 3 px gap), shapes fully inside the image."""
    out: list[Shape] = []
    for kind, colour in specs:
        for _ in range(tries):
            r = float(rng.uniform(rmin, rmax))
            cx = float(rng.uniform(r + 2, size - r - 2))
            cy = float(rng.uniform(r + 2, size - r - 2))
            if all(np.hypot(cx - o.cx, cy - o.cy) > (r + o.r) * 1.15 + 3 for o in out):
                out.append(Shape(kind, colour, cx, cy, r))
                break
        else:
            return None
    return out


def _colour_scene(rng: np.random.Generator):
    """Target (colour, kind) unique in the scene, with a same-colour and/or same-kind distractor."""
    colours, kinds = list(COLOURS), list(KINDS)
    while True:
        tc, tk = colours[rng.integers(len(colours))], kinds[rng.integers(len(kinds))]
        specs = [(tk, tc)]
        n_extra = int(rng.integers(1, 4))  # 2-4 shapes in all
        # at least one confusable distractor: same kind other colour, or same colour other kind
        for i in range(n_extra):
            mode = rng.integers(3) if i else rng.integers(2)
            if mode == 0:
                k, c = tk, colours[rng.integers(len(colours))]
            elif mode == 1:
                k, c = kinds[rng.integers(len(kinds))], tc
            else:
                k, c = kinds[rng.integers(len(kinds))], colours[rng.integers(len(colours))]
            if (k, c) == (tk, tc):
                continue
            specs.append((k, c))
        if len(specs) < 2:
            continue
        order = rng.permutation(len(specs))
        shapes = _place(rng, [specs[i] for i in order])
        if shapes is None:
            continue
        target = shapes[int(np.where(order == 0)[0][0])]
        template = COLOUR_TEMPLATES[rng.integers(len(COLOUR_TEMPLATES))]
        return shapes, target, template.format(colour=tc, kind=tk)


def _spatial_scene(rng: np.random.Generator, min_gap: float = 10.0):
    """2-3 shapes of the named kind (often one colour) plus 0-2 of other kinds; the target is the extreme one
    along the named direction, at least ``min_gap`` px (centre to centre) ahead of the next one."""
    colours, kinds = list(COLOURS), list(KINDS)
    while True:
        tk = kinds[rng.integers(len(kinds))]
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        n_same = int(rng.integers(2, 4))
        if rng.random() < 0.6:  # one colour for all of them: only position tells them apart
            c = colours[rng.integers(len(colours))]
            same = [(tk, c)] * n_same
        else:
            same = [(tk, colours[rng.integers(len(colours))]) for _ in range(n_same)]
        others = [(k, colours[rng.integers(len(colours))])
                  for k in (kinds[rng.integers(len(kinds))] for _ in range(int(rng.integers(0, 3)))) if k != tk]
        specs = same + others
        order = rng.permutation(len(specs))
        shapes = _place(rng, [specs[i] for i in order])
        if shapes is None:
            continue
        cands = [s for s in shapes if s.kind == tk]
        key = {"leftmost": lambda s: s.cx, "rightmost": lambda s: -s.cx,
               "topmost": lambda s: s.cy, "bottommost": lambda s: -s.cy}[direction]
        cands.sort(key=key)
        if key(cands[1]) - key(cands[0]) < min_gap:
            continue
        template = SPATIAL_TEMPLATES[rng.integers(len(SPATIAL_TEMPLATES))]
        return shapes, cands[0], template.format(direction=direction, kind=tk)


def make_sample(seed: int, family: str) -> Sample:
    """The sample of ``seed`` for prompt family ``"colour"`` or ``"spatial"`` (deterministic)."""
    rng = np.random.default_rng([int(seed), 0 if family == "colour" else 1])
    if family == "colour":
        shapes, target, prompt = _colour_scene(rng)
    elif family == "spatial":
        shapes, target, prompt = _spatial_scene(rng)
    else:
        raise ValueError(f"unknown prompt family {family!r}")
    image = render(shapes, rng)
    return Sample(image=image, mask=shape_mask(target), prompt=prompt, answer=ANSWER, family=family,
                  target=target, shapes=shapes)


# seeds: training draws from [0, 10**8), the held-out set from [10**9, ...): never the same scene
HELDOUT_SEED_BASE = 10**9


def write_heldout(root, n_spatial: int = 120, n_colour: int = 40, seed: int = 0) -> int:
    """Write the held-out set in maskport's sample format (``maskport.verify.samples``):

    ``root/samples.jsonl`` -- one JSON object a line: ``id``, ``image`` (PNG, relative path), ``prompt``,
    ``gt_mask`` (PNG, non-zero = object), ``answer`` (the reference answer) and ``task`` (``"spatial"`` for
    the stage-2 prompts, ``"colour"`` for the stage-1 prompts); ``root/images/*.png``, ``root/masks/*.png``.
    """
    import json
    from pathlib import Path

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    plan = [("spatial", i) for i in range(n_spatial)] + [("colour", i) for i in range(n_colour)]
    for n, (family, i) in enumerate(plan):
        s = make_sample(HELDOUT_SEED_BASE + seed * 10**6 + n, family)
        sid = f"{family}-{i:04d}"
        s.image.save(root / "images" / f"{sid}.png", optimize=True)
        Image.fromarray(s.mask.astype(np.uint8) * 255).convert("1").save(root / "masks" / f"{sid}.png",
                                                                          optimize=True)
        lines.append(json.dumps({"id": sid, "image": f"images/{sid}.png", "prompt": s.prompt,
                                 "gt_mask": f"masks/{sid}.png", "answer": s.answer, "task": family}))
    (root / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)
