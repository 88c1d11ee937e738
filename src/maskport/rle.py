"""COCO run-length encoding (RLE), the mask format of COCO/RefCOCO annotations, of Sa2VA's evaluation output and
of ``maskport serve``'s answers. pycocotools (the COCO API's own codec) does the encoding and decoding; this module
only adapts shapes and types and checks what it is given.

An RLE is ``{"size": [H, W], "counts": ...}``: runs down the columns (column-major), alternating background and
foreground, starting with background. ``counts`` is COCO's compressed ASCII string (what :func:`encode` returns) or
a list of ints (uncompressed; :func:`decode` accepts both).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as _coco

MAX_RLE_PIXELS = 1 << 28  # a decoded mask above this many pixels is refused (untrusted sizes)


def encode(mask: Any) -> dict[str, Any]:
    """Boolean mask ``(H, W)`` (or ``(1, H, W)``, as ``predict_forward`` returns it) -> compressed RLE with
    ``counts`` as a str (JSON-ready)."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {list(m.shape)}")
    rle = _coco.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _checked(rle: Any) -> dict[str, Any]:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE is a dict with 'size' [H, W] and 'counts'")
    size = rle["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise ValueError(f"RLE size must be [H, W] of non-negative ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h * w > MAX_RLE_PIXELS:
        raise ValueError(f"RLE size {h} x {w} is over the {MAX_RLE_PIXELS} pixel limit")
    counts = rle["counts"]
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("compressed RLE counts must be ASCII") from None
    if isinstance(counts, bytes):
        if any(c < 48 or c > 111 for c in counts):  # each character is a 6-bit group + 48
            raise ValueError("compressed RLE counts hold a character outside COCO's alphabet ('0'..'o')")
        return {"size": [h, w], "counts": counts}
    if isinstance(counts, (list, tuple)):
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("uncompressed RLE counts must be non-negative ints")
        if sum(int(c) for c in counts) != h * w:
            raise ValueError(f"RLE counts sum to {sum(int(c) for c in counts)}, expected {h} x {w} = {h * w}")
        return _coco.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
    raise ValueError(f"RLE counts must be a str or a list of ints, got {type(counts).__name__}")


def decode(rle: dict[str, Any]) -> np.ndarray:
    """RLE (compressed or uncompressed) -> boolean ``(H, W)`` array. A compressed string whose runs do not add up
    to H x W is refused."""
    r = _checked(rle)
    h, w = r["size"]
    if isinstance(rle["counts"], (str, bytes)) and int(_coco.area(r)) > h * w:
        raise ValueError("RLE counts cover more than H x W pixels")
    m = _coco.decode(r)
    if m.shape != (h, w):
        raise ValueError(f"RLE decodes to {list(m.shape)}, not its size {[h, w]}")
    if isinstance(rle["counts"], (str, bytes)):
        # pycocotools stops silently at H x W (extra runs) or pads (missing runs): re-encode and compare
        if encode(m)["counts"].encode("ascii") != r["counts"]:
            raise ValueError(f"RLE counts do not describe exactly {h} x {w} pixels")
    return m.astype(bool)


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons (each a flat ``[x1, y1, x2, y2, ...]`` in pixels) -> their union as a boolean mask,
    rasterised as the COCO API does (a pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``)."""
    polys = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not polys:
        return np.zeros((height, width), dtype=bool)
    rles = _coco.frPyObjects(polys, height, width)
    return np.asarray(_coco.decode(_coco.merge(rles)), dtype=bool)


__all__ = ["decode", "encode", "polygons_to_mask"]
