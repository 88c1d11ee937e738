"""Typed errors. Each message says what was expected, what was found and what to do.

The CLI prints ``str(error)`` on one line and exits with code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations


class MaskportError(Exception):
    """Base class of every error maskport raises on purpose."""

    exit_code = 2


class UnreadableFile(MaskportError):
    """A file or folder could not be opened or parsed."""


class UnsafeCheckpoint(MaskportError):
    """A pickle asks for code outside the allowlist; loading it would execute arbitrary code."""


class MissingInput(MaskportError):
    """A required input (base folder, SAM2 checkpoint, ...) was not given or does not exist."""


class WrongFamily(MaskportError):
    """An input belongs to another model family than the one being converted."""


class MissingTensor(MaskportError):
    """A tensor that a rule needs, or that the target model needs, was not found."""


class UnaccountedTensor(MaskportError):
    """A source tensor is neither used by a rule nor dropped with a reason."""


class DuplicateTarget(MaskportError):
    """Two rules produce the same target tensor."""


class ShapeMismatch(MaskportError):
    """A tensor's shape is not the one the plan or the target model expects."""


class ValueMismatch(MaskportError):
    """A tensor that should duplicate another (e.g. a buffer saved beside the trained weights) holds other values."""


class UnsupportedCheckpoint(MaskportError):
    """A checkpoint format that maskport recognises but cannot convert yet (e.g. DeepSpeed ZeRO-3)."""


class NonFiniteOutput(MaskportError):
    """A computed export tensor holds NaN/inf although every input it was computed from is finite."""


class PlanError(MaskportError):
    """Several problems found while planning; the message lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = f"the conversion plan has {len(problems)} problem(s); nothing was written"
        shown = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{head}:\n  - {shown}{more}")
