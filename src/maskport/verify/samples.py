"""Sample sets: what verify, quantize calibration and the demo read.

JSONL format (one object per line; paths relative to the JSONL file):
    {"image": "images/0001.png", "prompt": "<image>Please segment the red circle.", "gt_mask": "masks/0001.png"}
``gt_mask`` is optional (a PNG whose non-zero pixels are the object); ``id`` is optional (default: line number);
``answer`` is optional (a reference answer, e.g. "Sure, [SEG].", used for calibration).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MissingInput, UnreadableFile


@dataclass
class Sample:
    id: str
    image_path: Path
    prompt: str
    gt_mask_path: Path | None = None
    answer: str | None = None

    def image(self):
        from PIL import Image

        with Image.open(self.image_path) as im:
            return im.convert("RGB")

    def gt_mask(self) -> np.ndarray | None:
        if self.gt_mask_path is None:
            return None
        from PIL import Image

        with Image.open(self.gt_mask_path) as im:
            return np.asarray(im.convert("L")) > 0


def load_jsonl(path: str | Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"sample file {path} does not exist")
    root = path.parent
    out: list[Sample] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise UnreadableFile(f"{path}:{n}: not JSON ({exc})") from exc
        if not isinstance(rec, dict) or "image" not in rec or "prompt" not in rec:
            raise UnreadableFile(f"{path}:{n}: each line needs 'image' and 'prompt'")
        img = root / rec["image"]
        if not img.is_file():
            raise MissingInput(f"{path}:{n}: image {img} does not exist")
        gt = root / rec["gt_mask"] if rec.get("gt_mask") else None
        if gt is not None and not gt.is_file():
            raise MissingInput(f"{path}:{n}: gt_mask {gt} does not exist")
        out.append(Sample(str(rec.get("id", n)), img, rec["prompt"], gt, rec.get("answer")))
    if not out:
        raise UnreadableFile(f"{path}: no samples")
    return out
