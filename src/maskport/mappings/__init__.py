"""Model families. Each module registers itself; the engine never branches on a family's name.

Adding a family = a new module here (rules + detection + export builder), a fixture and a test.
"""

from .registry import FAMILIES, Family, detect_family, get_family, register  # noqa: F401

# importing a family module registers it
from . import sa2va_qwen2_5_vl  # noqa: E402,F401
from . import sa2va_internvl  # noqa: E402,F401
