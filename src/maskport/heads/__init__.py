"""Shared mask-head pieces that families pick.

- ``remote/``: export code, copied verbatim into the exports of the families that list it in ``FamilySpec.heads``
  (each imports only torch, transformers, numpy, PIL and its ``remote/`` siblings):
  ``image_utils`` (images in, device/dtype), ``seg_token`` (``[SEG]`` generation and selection, shared by the
  ``[SEG]``-token families), ``sam2_image`` (SAM2 prompted by language embeddings, image path), ``sam2_video`` (the export's
  ``Sam2VideoModel``, language prompts on key frames and streamed propagation through a video), ``sam_image``
  (SAM v1 prompted by language embeddings, LISA's image path: resize longest side, pad, ``postprocess_masks``).
- converter side, one module per head: :mod:`maskport.heads.sam2` (Meta's SAM2 ``.pt`` -> transformers'
  ``Sam2VideoModel`` mapping table (image parts named as in ``Sam2Model``), presets, the ``--sam2*`` inputs); :mod:`maskport.heads.sam` (Meta's SAM v1
  ``sam_vit_{b,l,h}_*.pth`` -> transformers' ``SamModel`` table, presets from shapes, the ``--sam`` input; for
  LISA and F-LMM).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REMOTE_DIR = Path(__file__).resolve().parent / "remote"


def remote_file(head: str) -> Path:
    """The export file of a shared head (``sam2_image`` -> ``.../heads/remote/sam2_image.py``)."""
    path = REMOTE_DIR / f"{head}.py"
    if not path.is_file():
        raise KeyError(f"no shared head {head!r} in {REMOTE_DIR}")
    return path


def remote_heads() -> list[str]:
    return sorted(p.stem for p in REMOTE_DIR.glob("*.py") if not p.name.startswith("_"))


def alias_remote_heads(package: str) -> None:
    """Make ``from .sam2_image import ...`` work inside a family's ``remote`` package (as it does in an export
    folder, where the head files lie beside the modeling file): each shared head module is registered under
    ``{package}.{head}`` too. Called by each family's ``remote/__init__.py``."""
    for head in remote_heads():
        sys.modules.setdefault(f"{package}.{head}", importlib.import_module(f"{__name__}.remote.{head}"))
