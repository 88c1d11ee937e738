"""Family ``sa2va-qwen3-vl``: Sa2VA fine-tuned on a Qwen3-VL base with SAM2.

- ``spec.py``: names, export code, inputs (``--base``, ``--sam2*``, LoRA);
- ``mapping.py``: the mapping table;
- ``family.py``: detection and input handling (base folder, SAM2, tokenizer, export config);
- ``quant.py``: what ``maskport quantize`` needs (staging, calibration batches);
- ``remote/``: the configuration and modeling files copied into each export.
"""

from .family import Sa2VAQwen3VL
from .spec import SPEC

FAMILY = Sa2VAQwen3VL()

__all__ = ["FAMILY", "SPEC"]
