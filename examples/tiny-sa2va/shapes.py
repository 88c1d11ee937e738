"""The synthetic referring-segmentation task of the tiny Sa2VA demo.

Each sample is a 128x128 RGB image on a noisy grey background holding 2-5 flat shapes (circle, square,
triangle) in a few colours, a prompt that names exactly one of them, the answer ``"Sure, [SEG]."`` and the
ground-truth mask of that shape (the pixels PIL painted for it).

Two prompt families:

- ``colour`` (stage 1, "pre-training"): ``"<image>Please segment the red triangle."`` -- colour + kind of the
  target in red / green / blue / yellow; 2-4 shapes, no two of one colour;
- ``new_colour`` (stage 2, "fine-tuning"): ``"<image>Please segment the purple triangle."`` -- the target is purple,
  orange or cyan, colours stage 1 never showed nor named, and the scene usually holds an old colour that looks
  alike (red or blue next to purple, ...). The base tokenizer splits these words into pieces stage 1 never
  trained.

Everything is a pure function of an integer seed: ``make_sample(seed, family)`` always returns the same
image, prompt and mask (numpy's PCG64 generator and PIL's drawing are deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
KINDS = ("circle", "square", "triangle")
COLOURS = {  # stage 1's colours: name -> RGB centre (each shape's colour is jittered around it)
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 215),
    "yellow": (225, 205, 40),
}
NEW_COLOURS = {  # stage 2's colours, each with the stage-1 colours it is easiest to confuse with
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
}
LOOKALIKES = {"purple": ("red", "blue"), "orange": ("red", "yellow"), "cyan": ("green", "blue")}
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}
ANSWER = "Sure, [SEG]."

COLOUR_TEMPLATES = (
    "<image>Please segment the {colour} {kind}.",
    "<image>Segment the {colour} {kind} in this image.",
    "<image>Can you segment the {colour} {kind}?",
)

# The text the base tokenizer was trained on (stage 1 builds the tokenizer from it): the task's words plus a few
# phrases the demo does not use, as any tokenizer corpus has. Kept fixed so that stage 1 stays reproducible; it
# holds none of NEW_COLOURS' names.
_CORPUS_PLACES = ("on the left", "on the right", "at the top", "at the bottom")
_CORPUS_PLACE_TEMPLATES = (
    "<image>Please segment the {colour} {kind} {place}.",
    "<image>Segment the {colour} {kind} {place} in this image.",
    "<image>Can you segment the {colour} {kind} {place}?",
)
VOCABULARY_TEXT = " ".join(
    [t.format(colour=c, kind=k, place=p).replace("<image>", "")
     for t in COLOUR_TEMPLATES + _CORPUS_PLACE_TEMPLATES for c in COLOURS for k in KINDS for p in _CORPUS_PLACES][:40]
    + list(COLOURS) + list(KINDS) + list(_CORPUS_PLACES) + [ANSWER]
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
        base = np.array(ALL_COLOURS[s.colour], dtype=np.float32)
        col = np.clip(base + rng.normal(0.0, 12.0, size=3), 0, 255).astype(int)
        _draw(draw, s, tuple(int(c) for c in col))
    return img


def _place(rng: np.random.Generator, specs: list, size: int = IMAGE_SIZE, rmin: float = 9.0, rmax: float = 20.0,
           tries: int = 200) -> list[Shape] | None:
    """Non-overlapping placement (bounding circles apart by 15% + 3 px), shapes fully inside the image.

    ``specs``: ``(kind, colour)`` or ``(kind, colour, axis, lo, hi)``, the latter keeping the centre's ``axis``
    ("x" or "y") coordinate within ``[lo, hi]``."""
    out: list[Shape] = []
    for spec in specs:
        kind, colour = spec[0], spec[1]
        for _ in range(tries):
            r = float(rng.uniform(rmin, rmax))
            lo = {"x": r + 2, "y": r + 2}
            hi = {"x": size - r - 2, "y": size - r - 2}
            if len(spec) == 5:
                axis, a, b = spec[2], spec[3], spec[4]
                lo[axis], hi[axis] = max(lo[axis], a), min(hi[axis], b)
                if lo[axis] >= hi[axis]:
                    continue
            cx = float(rng.uniform(lo["x"], hi["x"]))
            cy = float(rng.uniform(lo["y"], hi["y"]))
            if all(np.hypot(cx - o.cx, cy - o.cy) > (r + o.r) * 1.15 + 3 for o in out):
                out.append(Shape(kind, colour, cx, cy, r))
                break
        else:
            return None
    return out


def _colour_scene(rng: np.random.Generator):
    """2-4 shapes of distinct colours (kinds at random, repeats allowed); the target is one of them."""
    colours, kinds = list(COLOURS), list(KINDS)
    while True:
        n = int(rng.integers(2, 5))
        cs = [colours[i] for i in rng.permutation(len(colours))[:n]]
        specs = [(kinds[rng.integers(len(kinds))], c) for c in cs]
        shapes = _place(rng, specs)
        if shapes is None:
            continue
        target = shapes[int(rng.integers(n))]
        template = COLOUR_TEMPLATES[rng.integers(len(COLOUR_TEMPLATES))]
        return shapes, target, template.format(colour=target.colour, kind=target.kind)


def _new_colour_scene(rng: np.random.Generator):
    """2-4 shapes of distinct colours; the target has a stage-2 colour; with probability 0.8 one of its
    look-alike stage-1 colours is in the scene too."""
    kinds, new = list(KINDS), list(NEW_COLOURS)
    while True:
        tc = new[rng.integers(len(new))]
        n = int(rng.integers(2, 5))
        cs = [tc]
        if rng.random() < 0.8:
            cs.append(LOOKALIKES[tc][rng.integers(2)])
        pool = [c for c in ALL_COLOURS if c not in cs]
        cs += [pool[i] for i in rng.permutation(len(pool))[: max(0, n - len(cs))]]
        specs = [(kinds[rng.integers(len(kinds))], c) for c in cs]
        order = rng.permutation(len(specs))
        shapes = _place(rng, [specs[i] for i in order])
        if shapes is None:
            continue
        target = shapes[int(np.where(order == 0)[0][0])]
        template = COLOUR_TEMPLATES[rng.integers(len(COLOUR_TEMPLATES))]
        return shapes, target, template.format(colour=tc, kind=target.kind)


FAMILIES = ("colour", "new_colour")
TASK_OF_FAMILY = {"colour": "stage1", "new_colour": "stage2"}


def make_sample(seed: int, family: str) -> Sample:
    """The sample of ``seed`` for prompt family ``"colour"`` or ``"new_colour"`` (deterministic)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown prompt family {family!r}")
    rng = np.random.default_rng([int(seed), FAMILIES.index(family) * 2])
    shapes, target, prompt = (_colour_scene if family == "colour" else _new_colour_scene)(rng)
    image = render(shapes, rng)
    return Sample(image=image, mask=shape_mask(target), prompt=prompt, answer=ANSWER, family=family,
                  target=target, shapes=shapes)


# seeds: training draws from [0, 10**8), the held-out set from [10**9, ...): never the same scene
HELDOUT_SEED_BASE = 10**9


def write_heldout(root, n_stage2: int = 120, n_stage1: int = 40, seed: int = 0) -> int:
    """Write the held-out set in maskport's sample format (``maskport.verify.samples``):

    ``root/samples.jsonl`` -- one JSON object a line: ``id``, ``image`` (PNG, relative path), ``prompt``,
    ``gt_mask`` (PNG, non-zero = the object), ``answer`` (the reference answer), ``task`` (``"stage2"``: prompts
    only stage 2 taught -- new colours; ``"stage1"``: the stage-1 prompts) and ``family``;
    ``root/images/<id>.png`` (128x128 RGB), ``root/masks/<id>.png`` (1-bit).
    """
    import json
    from pathlib import Path

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    plan = [("new_colour", i) for i in range(n_stage2)] + [("colour", i) for i in range(n_stage1)]
    for n, (family, i) in enumerate(plan):
        s = make_sample(HELDOUT_SEED_BASE + seed * 10**6 + n, family)
        task = TASK_OF_FAMILY[family]
        sid = f"{task}-{i:04d}"
        s.image.save(root / "images" / f"{sid}.png", optimize=True)
        Image.fromarray(s.mask.astype(np.uint8) * 255).convert("1").save(root / "masks" / f"{sid}.png",
                                                                          optimize=True)
        lines.append(json.dumps({"id": sid, "image": f"images/{sid}.png", "prompt": s.prompt,
                                 "gt_mask": f"masks/{sid}.png", "answer": s.answer, "task": task,
                                 "family": family}))
    (root / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def write_calibration(root, n: int = 128, seed: int = 0) -> int:
    """Write ``n`` training-style samples (same format as :func:`write_heldout`) for quantization calibration.

    The mix is stage 2's (3 ``new_colour`` : 1 ``colour``); seeds start at stage 2's training offset
    (``50_000_000 + seed * 100_000``): the kind of data a user calibrates with (their training set), never the
    held-out range, so calibrating on them does not peek at the evaluation.
    """
    import json
    from pathlib import Path

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        family = "colour" if i % 4 == 3 else "new_colour"
        s = make_sample(50_000_000 + seed * 100_000 + i, family)
        sid = f"calib-{i:04d}"
        s.image.save(root / "images" / f"{sid}.png", optimize=True)
        Image.fromarray(s.mask.astype(np.uint8) * 255).convert("1").save(root / "masks" / f"{sid}.png",
                                                                          optimize=True)
        lines.append(json.dumps({"id": sid, "image": f"images/{sid}.png", "prompt": s.prompt,
                                 "gt_mask": f"masks/{sid}.png", "answer": s.answer,
                                 "task": TASK_OF_FAMILY[family], "family": family}))
    (root / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)
