"""Family ``sa2va-internvl``: Sa2VA fine-tuned on InternVL2.5 / InternVL3 (Qwen2 or InternLM2 language model) with
SAM2; also imports released Sa2VA folders (``maskport convert sa2va-hf-to-native``).

- ``spec.py``: names, export code, inputs; ``mapping.py``: the mapping table (``internlm2_llama.py``: the
  InternLM2 -> Llama part); ``family.py``: detection and input handling; ``internlm2_tokenizer.py``: InternLM2's
  SentencePiece model as a fast tokenizer; ``quant.py``: the quantize target; ``remote/``: the exported code.
"""

from .family import Sa2VAInternVL
from .spec import SPEC

FAMILY = Sa2VAInternVL()

__all__ = ["FAMILY", "SPEC"]
