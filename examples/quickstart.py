"""Quick start on a tiny, freshly built Sa2VA training run (no downloads).

1. builds a tiny Sa2VA-on-Qwen2.5-VL training run with the real libraries (transformers, peft, Meta's sam2,
   mmengine's Runner): a base folder, a Meta SAM2 .pt and a genuine mmengine iter_2.pth;
2. converts it with ``maskport convert mmengine-to-hf``;
3. loads the export with transformers alone and runs ``predict_forward``.

The model is trained for two steps only, so its answers are noise; to see masks, [SEG] is encouraged with a
generation bias. The trained demo lives in ``examples/tiny-sa2va``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's maskport.testing (the fixture builder)


def main(out: str = "exports/quickstart-sa2va") -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer

    from maskport.testing.sa2va_qwen2_5_vl import make_sa2va_qwen_fixture

    work = Path(tempfile.mkdtemp(prefix="maskport-quickstart-"))
    print(f"1. building a tiny Sa2VA training run in {work} ...", flush=True)
    fx = make_sa2va_qwen_fixture(work, seed=0)
    print(f"   training checkpoint: {fx.ckpt}")
    print("2. converting:", flush=True)
    cmd = [str(Path(sys.executable).parent / "maskport"), "convert", "mmengine-to-hf", str(fx.ckpt),
           "--base", str(fx.base_dir), "--sam2", str(fx.sam2_pt), "-o", out, "--overwrite"]
    print("   $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    print("3. loading the export with transformers and predicting:", flush=True)
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    img = Image.fromarray((np.random.RandomState(0).rand(160, 200, 3) * 255).astype("uint8"))
    seg = tok.convert_tokens_to_ids("[SEG]")
    res = model.predict_forward(image=img, text="<image>Please segment the red circle.", tokenizer=tok,
                                max_new_tokens=4, generation_kwargs={"sequence_bias": {(seg,): 30.0}})
    print(f"   prediction: {res['prediction']!r}")
    print(f"   masks: {[(m.dtype.name, m.shape, int(m.sum())) for m in res['prediction_masks']]}")
    print(f"export: {Path(out).resolve()} (conversion_report.json lists every tensor)")


if __name__ == "__main__":
    main(*sys.argv[1:])
