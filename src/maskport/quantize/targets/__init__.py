"""What ``maskport quantize`` needs to know about each export family: the :class:`QuantTarget` interface. Each family
has one in its folder (``maskport/families/<family>/quant.py``, named by ``FamilySpec.quant_target``); the quantize
code finds it by the export's ``model_type`` and never branches on a family's name.

Common to every family (transformers' native VLMs all keep their text model there): the quantized modules are the
decoder linears under ``mllm.model.language_model.layers`` (GPTQModel's module tree for ``qwen2_5_vl`` and
``internvl`` alike). What differs, and what a target says:

- which export it handles (``spec``: the family's spec, whose ``model_type`` the export's ``config.json`` holds);
- which composite prefixes stay floating point (vision tower, projector, ``lm_head``, SAM2, ``text_hidden_fcs``),
  and the same for the standalone language-model folder (``--save-mllm``);
- how to stage the export's ``mllm`` as a standalone folder that GPTQModel loads (weights, config, tokenizer,
  processor);
- how one calibration sample becomes a batch, with the export's own preprocessing, so the decoder layers see the
  inputs ``predict_forward`` gives them: :meth:`QuantTarget.image_batch` and :meth:`QuantTarget.text_batch`.

Adding a family's target = ``quant.py`` in its folder, and a test that quantizes its fixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import MissingInput

DECODER_BLOCK = "mllm.model.language_model.layers"


@dataclass
class ImageBatch:
    """One calibration batch with its image, and what it took to fit ``max_seq_len``."""

    batch: dict[str, torch.Tensor]
    image_tokens: int       # tokens of the image in the sequence
    reduced: bool           # the image was given fewer tokens than predict_forward would give it


class QuantTarget:
    """A family's quantization facts; subclass in the family's ``quant.py`` and name the instance in its spec."""

    spec = None                                    # the family's FamilySpec
    excluded_prefixes: tuple[str, ...] = ()       # composite (export) prefixes kept floating point
    standalone_excluded: tuple[str, ...] = ()     # the same in the standalone MLLM folder
    vision_prefixes: tuple[str, ...] = ()         # composite prefixes counted as "vision" in the size table
    unsupported_methods: dict[str, str] = {}      # method -> why it is refused for this family (before loading)

    def stage(self, model, tokenizer, folder: Path) -> None:
        """Save ``model.mllm`` as a standalone folder GPTQModel can load (weights, config, tokenizer, processor)."""
        raise NotImplementedError

    def text_batch(self, model, tokenizer, prompt: str, answer_text: str) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` of the prompt without its image, the answer teacher-forced."""
        raise NotImplementedError

    def image_batch(self, model, tokenizer, prompt: str, answer_text: str, image,
                    max_seq_len: int) -> ImageBatch | None:
        """The batch ``predict_forward`` would build for ``image`` + ``prompt``, the answer teacher-forced; the image
        given fewer tokens where the sequence would exceed ``max_seq_len``; ``None`` when even that cannot fit."""
        raise NotImplementedError


def target_for(model_type: str | None, where: str = "the export") -> QuantTarget:
    """The target of an export's ``model_type``, or a MissingInput naming the ones that can be quantized."""
    from ...families import FAMILIES, family_for_model_type

    fam = family_for_model_type(model_type)
    if fam is not None and fam.spec.quant_target is not None:
        return fam.quant_target()
    known = ", ".join(f"{f.name} ({f.spec.model_type})" for f in FAMILIES.values() if f.spec.quant_target)
    why = f" (family {fam.name}: {fam.spec.no_quant_reason})" if fam is not None else ""
    raise MissingInput(f"{where} is not a maskport export that can be quantized (model_type={model_type!r}){why}; "
                       f"known: {known}. Run maskport convert first")


def encode(tokenizer, text: str, bos: bool = False) -> dict[str, torch.Tensor]:
    """Token ids of ``text`` as one batch row (no special tokens added, BOS first when ``bos``)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if bos and tokenizer.bos_token_id is not None:
        ids = [int(tokenizer.bos_token_id)] + ids
    t = torch.tensor([ids], dtype=torch.long)
    return {"input_ids": t, "attention_mask": torch.ones_like(t)}


__all__ = ["DECODER_BLOCK", "ImageBatch", "QuantTarget", "encode", "target_for"]
