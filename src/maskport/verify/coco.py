"""COCO segmentations (what RefCOCO's ``instances.json`` holds) -> boolean masks.

A segmentation is either a list of polygons (each a flat ``[x1, y1, x2, y2, ...]`` in pixels) or a run-length
encoding ``{"size": [h, w], "counts": ...}`` (compressed string or list of ints). Both go through
:mod:`maskport.rle`, i.e. pycocotools, the COCO API's own codec and rasteriser: ground-truth masks are exactly the
ones the field's evaluation code sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import rle as _rle


def polygon_backend() -> str:
    """Which rasteriser draws polygons (always the COCO API's; kept for reports that name it)."""
    return "pycocotools"


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    return _rle.polygons_to_mask(polygons, height, width)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One COCO ``segmentation`` (polygons or RLE) -> (height, width) bool mask."""
    if isinstance(segmentation, dict):
        m = _rle.decode(segmentation)
        if m.shape != (height, width):
            raise ValueError(f"RLE size {list(m.shape)} does not match the image's {[height, width]}")
        return m
    if isinstance(segmentation, list):
        if segmentation and isinstance(segmentation[0], (int, float)):
            segmentation = [segmentation]
        return polygons_to_mask(segmentation, height, width)
    raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
