"""``python -m maskport``."""

from .cli_errors import entry

entry()
