"""Synthetic sample sets: images with a red box and a "segment the red box" prompt, written as ``samples.jsonl``
(the format of ``maskport verify --samples`` and ``maskport quantize --calib``). Used as calibration data and probe
images by the tests and the GPU benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["synthetic_samples"]


def synthetic_samples(root: Path, n: int, size=(640, 480)) -> Path:
    """Write ``n`` images ``0.png`` .. of ``size`` (width, height) -- noise seeded by the index, with a 200x160 red box
    at an index-dependent place -- and ``samples.jsonl`` under ``root``; return the jsonl's path."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.RandomState(i)
        a = (rng.rand(size[1], size[0], 3) * 255).astype(np.uint8)
        y, x = 40 + 7 * i % 200, 60 + 11 * i % 300
        a[y:y + 160, x:x + 200] = [220, 30, 30]
        Image.fromarray(a).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": "<image>Please segment the red box."})
    (root / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "samples.jsonl"


_synthetic_samples = synthetic_samples  # the name it had in maskport.quantize.bench
