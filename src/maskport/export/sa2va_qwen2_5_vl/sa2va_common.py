"""Inside the maskport package, the shared Sa2VA pieces live in ``maskport/export/common/sa2va_common.py``; maskport
copies that file itself into every export folder, next to the modeling file that imports it relatively. This module
only makes the same relative import work inside the package. It is never copied into an export."""

from ..common.sa2va_common import *  # noqa: F401,F403
from ..common.sa2va_common import __all__  # noqa: F401
