"""A conversion's declared inputs: :class:`InputOption` (one input a family takes, turned into a CLI option and an
API keyword) and :class:`ConvertOptions` (their values for one conversion). Shared by the families and the heads
(a head declares the inputs it needs, e.g. its checkpoint), so it lives with the engine, below both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import MissingInput

# the convert commands a family can take part in
MMENGINE_TO_HF = "mmengine-to-hf"


@dataclass(frozen=True)
class InputOption:
    """One input a family needs or accepts, declared once and turned into a CLI option (``--{name with -}``) of
    every convert command listed in ``commands``, and a keyword argument of the convert API.

    ``kind``: ``path`` | ``float`` | ``int`` | ``csv`` (comma-separated list) | ``choice`` (one of ``choices``)."""

    name: str
    kind: str
    help: str
    commands: tuple[str, ...] = (MMENGINE_TO_HF,)
    choices: tuple[str, ...] = ()
    default: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """The value as the family reads it (``None``: not given), or a one-line error naming the flag."""
        if value is None:
            return None
        if self.kind == "path":
            return Path(value)
        if self.kind == "choice":
            if value not in self.choices:
                raise MissingInput(f"{self.flag} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.kind == "csv":
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [str(v).strip() for v in items if str(v).strip()]
            if not items:
                raise MissingInput(f"{self.flag} is empty")
            return items
        try:
            return {"float": float, "int": int}[self.kind](value)
        except (TypeError, ValueError):
            raise MissingInput(f"{self.flag} must be a{'n' if self.kind == 'int' else ''} {self.kind}, "
                               f"got {value!r}") from None


class ConvertOptions:
    """The values of a family's declared inputs (``options.base``, ``options.sam2``, ...; ``None`` when not given,
    else the declared default) plus ``allow_unsafe_pickle``. Reading an input the family did not declare is an
    error: a family cannot depend on an option the CLI does not offer it."""

    def __init__(self, declared: Sequence[InputOption], values: dict[str, Any] | None = None,
                 allow_unsafe_pickle: bool = False):
        self._declared = {o.name: o for o in declared}
        self._values = {name: (o.default if o.default is not None else None) for name, o in self._declared.items()}
        for k, v in (values or {}).items():
            if v is not None:
                self._values[k] = self._declared[k].parse(v)
        self.allow_unsafe_pickle = allow_unsafe_pickle

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._declared:
            raise AttributeError(f"input {name!r} is not declared by this family")
        return self._values[name]

    def given(self) -> dict[str, Any]:
        """The inputs given (not defaults), for the report."""
        return {k: v for k, v in self._values.items() if v is not None and v != self._declared[k].default}

    def paths(self) -> dict[str, Path]:
        return {k: v for k, v in self._values.items() if v is not None and self._declared[k].kind == "path"}
