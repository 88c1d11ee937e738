"""Family ``flmm``: F-LMM (a frozen LMM grounded by a U-Net on its attention maps, refined by SAM ViT-L).

- ``spec.py``: names, export code, inputs (``--base``, ``--sam``);
- ``mapping.py``: the mapping table;
- ``family.py``: detection and input handling (base folder, SAM, the U-Net's sizes, export config);
- ``remote/``: the configuration and modeling files copied into each export.
"""

from .family import FLMM
from .spec import SPEC

FAMILY = FLMM()

__all__ = ["FAMILY", "SPEC"]
