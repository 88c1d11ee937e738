"""Test fixtures and reference implementations for maskport's tests, examples and benchmarks.

Importing this package (or any module of it) loads no training stack: mmengine, peft, DeepSpeed, Meta's sam2, hydra
and sentencepiece are imported inside the functions that need them (install ``maskport[test]`` for those).

* :mod:`.common` -- Sa2VA's added tokens; random-weight helpers (``perturb_``, ``round_bf16_``)
* :mod:`.tokenizers` -- tiny offline tokenizers (byte-level BPE with Qwen's tokens; InternLM2 SentencePiece folder)
* :mod:`.sam2` -- a tiny Meta SAM2 (hydra config, builder)
* :mod:`.samples` -- synthetic image + prompt sample sets (``samples.jsonl``)
* one module per model family, each building a genuine tiny training run of it:
  :mod:`.sa2va_qwen2_5_vl` (mmengine + DeepSpeed run), :mod:`.sa2va_internvl` (+ the released-format folder),
  :mod:`.lisa` (LLaVA v1 base, CLIP, Meta SAM, peft run as DeepSpeed / zero_to_fp32 / released folders)
* :mod:`.references` -- independent reference forwards, the oracles of the tests:
  :mod:`.references.internvl` (InternViT, InternLM2, InternVL-chat), :mod:`.references.sam2` (Sa2VA's
  language-prompted SAM2 mask head, Meta's and transformers' paths)
"""
