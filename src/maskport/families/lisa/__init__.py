"""Family ``lisa``: LISA (LLaVA v1 on Llama-2 / Vicuna + CLIP ViT-L/14 + SAM ViT-H + ``[SEG]``) and the many forks
that keep its layout.

- ``spec.py``: names, export code, inputs (``--base``, ``--clip``, ``--sam``, LoRA);
- ``mapping.py``: the mapping table (training runs and released folders);
- ``family.py``: detection and input handling (base LLaVA folder, CLIP folder, SAM checkpoint, tokenizer, export
  config);
- ``quant.py``: what ``maskport quantize`` needs (staging, calibration batches);
- ``remote/``: the configuration and modeling files copied into each export.
"""

from .family import Lisa
from .spec import SPEC

FAMILY = Lisa()

__all__ = ["FAMILY", "SPEC"]
