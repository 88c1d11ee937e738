"""COCO segmentations (what RefCOCO's ``instances.json`` holds) -> boolean masks.

A segmentation is either a list of polygons (each a flat ``[x1, y1, x2, y2, ...]`` in pixels) or a run-length
encoding ``{"size": [h, w], "counts": ...}``. RLE runs go down the columns (column-major), alternating
background/foreground and starting with background; ``counts`` is a list of ints (uncompressed) or COCO's
compact ASCII form (compressed), both decoded here exactly.

Polygons: when ``pycocotools`` is installed it rasterises them (so GT masks are exactly the field's); otherwise
PIL's polygon fill is used, which can differ from pycocotools by one pixel along the outline. Which one was used
is reported by :func:`polygon_backend`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _pycocotools_mask():
    try:
        from pycocotools import mask as mask_utils  # optional dependency

        return mask_utils
    except Exception:  # noqa: BLE001 - not installed or broken build: fall back to PIL
        return None


def polygon_backend() -> str:
    return "pycocotools" if _pycocotools_mask() is not None else "pil"


def rle_counts_from_string(s: str) -> list[int]:
    """Decode COCO's compressed RLE string: each count is written as 5-bit groups (low bits first), one ASCII
    character per group (value + 48); bit 0x20 says another group follows, bit 0x10 of the last group is the sign.
    From the fourth count on, the value is stored as the difference to the count two places before."""
    counts: list[int] = []
    pos = 0
    while pos < len(s):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(s):
                raise ValueError("truncated RLE string")
            c = ord(s[pos]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and (c & 0x10):
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_counts_to_string(counts: list[int]) -> str:
    """Inverse of :func:`rle_counts_from_string`."""
    out = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        while True:
            c = value & 0x1F
            value >>= 5
            more = value != -1 if c & 0x10 else value != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
            if not more:
                break
    return "".join(out)


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h} x {w} = {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()  # column-major


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Boolean (h, w) mask -> uncompressed RLE (list counts), column-major like COCO."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [h, w], "counts": [int(r) for r in runs]}


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    mask_utils = _pycocotools_mask()
    if mask_utils is not None:
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
        return np.asarray(mask_utils.decode(mask_utils.merge(rles)), dtype=bool)
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
        if len(pts) >= 3:
            draw.polygon(pts, fill=1, outline=1)
        elif pts:
            draw.point(pts, fill=1)
    return np.asarray(canvas, dtype=np.uint8) > 0


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One COCO ``segmentation`` (polygons or RLE) -> (height, width) bool mask."""
    if isinstance(segmentation, dict):
        m = rle_decode(segmentation)
        if m.shape != (height, width):
            raise ValueError(f"RLE size {list(m.shape)} does not match the image's {[height, width]}")
        return m
    if isinstance(segmentation, list):
        if segmentation and isinstance(segmentation[0], (int, float)):
            segmentation = [segmentation]
        return polygons_to_mask(segmentation, height, width)
    raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
