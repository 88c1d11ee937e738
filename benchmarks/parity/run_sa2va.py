"""Run Sa2VA's own HF ``predict_forward`` (its repository's model code, transformers 4.42) on the released-format
folder written by build.py, and save the answers and masks. Run it with a Python that has Sa2VA's dependencies
(see README.md), from inside the folder:

    python run_sa2va.py OUT/released OUT/sa2va.npz

Adaptations, none of which touches Sa2VA's computation: ``Tensor.cuda`` is a no-op and the SAM2 video state is
kept on the CPU (their code hard-codes CUDA); after ``preparing_for_generation``, which hard-codes InternViT's
448 px / 256 tokens per tile, the tile size and tokens per tile are set to the tiny tower's (56 px, 4 tokens);
the generation config gets ``max_new_tokens`` and a ``[SEG]`` bias so that the random model answers with masks.
"""

import os
import sys

import numpy as np
import torch

torch.Tensor.cuda = lambda self, *a, **k: self  # noqa: E731 - CPU here

import torchvision.transforms as T  # noqa: E402
from torchvision.transforms.functional import InterpolationMode  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inputs import MAX_NEW_TOKENS, PER_TILE, PROMPT, SEG_BIAS, SIZES, TILE, image  # noqa: E402

def main(folder, out):
    m = AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    m.preparing_for_generation(tokenizer=tok, max_new_tokens=MAX_NEW_TOKENS, torch_dtype=torch.float32)
    m.image_size, m.patch_token = TILE, PER_TILE
    m.transformer = T.Compose([T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
                               T.Resize((TILE, TILE), interpolation=InterpolationMode.BICUBIC), T.ToTensor(),
                               T.Normalize(mean=m.IMAGENET_MEAN, std=m.IMAGENET_STD)])
    predictor = type(m.grounding_encoder.sam2_model)
    init_state = predictor.init_state

    def init_state_on_cpu(self, images):
        st = init_state(self, images)
        st["device"] = st["storage_device"] = torch.device("cpu")
        return st

    predictor.init_state = init_state_on_cpu
    m.gen_config.sequence_bias = {(tok.convert_tokens_to_ids("[SEG]"),): SEG_BIAS}
    res = {}
    for i, (w, h) in enumerate(SIZES):
        with torch.no_grad():
            r = m.predict_forward(image=image(i, w, h), text=PROMPT, tokenizer=tok)
        res[f"text{i}"] = np.array(r["prediction"])
        for j, mk in enumerate(r["prediction_masks"]):
            res[f"mask{i}_{j}"] = np.asarray(mk)
        print(i, repr(r["prediction"]), len(r["prediction_masks"]), "masks", flush=True)
    np.savez(out, **res)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
