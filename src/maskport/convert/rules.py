"""Declarative mapping rules: which source tensors become which target tensors, and how.

A family's mapping table is a list of these rules (see ``maskport/mappings/``). Patterns name a source
and a key with placeholders: ``"ckpt:mllm.model.layers.{i}.{proj}.lora_A.default.weight"``.

- ``{name}`` matches one dotted segment (``[^.]+``);
- ``{rest}`` (or any placeholder whose name starts with ``rest``) matches one or more segments (``.+``).

Every rule has a *primary* pattern that is matched against the keys of its source; each match binds the
placeholders, which then fill the rule's other patterns (its other inputs and its targets). The engine
(:mod:`maskport.convert.plan`) expands rules into steps, checks coverage and shapes, and streams them.

Rule kinds:
- :class:`Rename`: one source tensor becomes one target tensor, unchanged.
- :class:`Take`: like ``Rename``, and *supersedes* other source tensors (peft ``modules_to_save``: the
  trained copy replaces the base tensor, which is then accounted for as superseded, not silently ignored).
- :class:`LoraMerge`: ``base + scaling * B @ A`` in float32, ``scaling`` bound in the table.
- :class:`Split` / :class:`Concat`: layout changes; :class:`Duplicate`: one tensor written to several targets.
- :class:`Apply`: any typed op of :mod:`maskport.convert.ops` (e.g. a LoRA merge chained with a grouped qkv split).
- :class:`Drop`: a source tensor deliberately not exported, with the reason.
- :class:`DropIfEqual`: a source tensor that duplicates another (a buffer DeepSpeed saved beside the trained
  parameters, equal to the copy another input holds): dropped once its values are checked equal to that copy; a
  copy that differs stops the conversion (:class:`~maskport.errors.ValueMismatch`). Runs after ordinary rules,
  on what they left unclaimed.
- :class:`DropRest`: every tensor of a source that no earlier rule claimed, left out with a reason.
- :class:`CopyRest`: every tensor of a source that no earlier rule claimed, renamed by a pattern. It runs
  after all other rules, so a table reads "these tensors are special; everything else is copied".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence

from . import ops


@dataclass(frozen=True)
class Ref:
    """A tensor of a named source."""

    source: str
    key: str

    def __str__(self) -> str:
        return f"{self.source}:{self.key}"


def parse_ref(pattern: str) -> tuple[str, str]:
    if ":" not in pattern:
        raise ValueError(f"pattern {pattern!r} must name its source, e.g. 'base:{pattern}'")
    source, key = pattern.split(":", 1)
    return source, key


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@lru_cache(maxsize=None)
def compile_pattern(key_pattern: str) -> re.Pattern:
    out, pos, seen = [], 0, set()
    for m in _PLACEHOLDER.finditer(key_pattern):
        out.append(re.escape(key_pattern[pos:m.start()]))
        name = m.group(1)
        if name in seen:
            out.append(f"(?P={name})")
        else:
            seen.add(name)
            out.append(f"(?P<{name}>.+)" if name.startswith("rest") else f"(?P<{name}>[^.]+)")
        pos = m.end()
    out.append(re.escape(key_pattern[pos:]))
    return re.compile("^" + "".join(out) + "$")


def fill(pattern: str, bindings: dict[str, str]) -> str:
    try:
        return pattern.format(**bindings)
    except KeyError as exc:
        raise ValueError(f"pattern {pattern!r} uses placeholder {exc} that its primary pattern does not bind") from exc


@dataclass
class Step:
    """One unit of work: read ``inputs``, apply ``op`` (a typed :class:`~maskport.convert.ops.Op`), produce
    ``targets`` (none, and no op, for a drop)."""

    rule: "Rule"
    targets: tuple[str, ...]
    inputs: tuple[Ref, ...]
    op: ops.Op | None
    superseded: tuple[Ref, ...] = ()
    reason: str | None = None
    equals: Ref | None = None  # a drop that is valid only if the superseded tensor equals this one (checked)

    @property
    def op_name(self) -> str:
        """The report's name of the op (``rename``, ``lora_merge(scaling=2.0)``, ...; ``drop``)."""
        return self.op.describe() if self.op is not None else "drop"

    def shapes(self, shapes: list) -> list:
        return self.op.shapes(shapes)

    def compute(self, xs: list) -> list:
        return self.op.compute(xs)


class Rule:
    """Base class. Subclasses set ``primary`` and implement :meth:`make_step`."""

    primary: str
    optional: bool = False
    note: str = ""
    #: expanded after every ordinary rule, over the tensors no rule claimed (``CopyRest``, ``DropIfEqual``)
    claims_rest: bool = False

    def describe(self) -> str:
        return f"{type(self).__name__}({self.primary})"

    def expand(self, keys_of: Callable[[str], Sequence[str]]) -> Iterator[Step]:
        source, key_pattern = parse_ref(self.primary)
        rx = compile_pattern(key_pattern)
        for key in keys_of(source):
            m = rx.match(key)
            if m:
                yield self.make_step(m.groupdict())

    def make_step(self, b: dict[str, str]) -> Step:
        raise NotImplementedError


def _ref(pattern: str, b: dict[str, str]) -> Ref:
    s, k = parse_ref(pattern)
    return Ref(s, fill(k, b))


@dataclass(frozen=True)
class Rename(Rule):
    target: str
    source: str
    optional: bool = False
    note: str = ""

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.source

    def make_step(self, b):
        return Step(self, (fill(self.target, b),), (_ref(self.source, b),), ops.Identity("rename"))


@dataclass(frozen=True)
class Take(Rule):
    """The source tensor becomes the target, superseding ``replaces`` (which must exist, and is not read)."""

    target: str
    source: str
    replaces: tuple[str, ...] = ()
    why: str = "modules_to_save: the trained copy replaces the base tensor"
    optional: bool = False

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.source

    def make_step(self, b):
        return Step(self, (fill(self.target, b),), (_ref(self.source, b),), ops.Identity("take"),
                    superseded=tuple(_ref(r, b) for r in self.replaces), reason=self.why)


@dataclass(frozen=True)
class LoraMerge(Rule):
    """``target = base + scaling * B @ A`` (``scaling``: peft's alpha / r, bound here by the table)."""

    target: str
    base: str
    a: str
    b: str
    scaling: float | None = None
    optional: bool = False

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.a

    def make_step(self, bnd):
        return Step(self, (fill(self.target, bnd),), (_ref(self.base, bnd), _ref(self.a, bnd), _ref(self.b, bnd)),
                    ops.LoraMerge(self.scaling))


@dataclass(frozen=True)
class Split(Rule):
    """One source tensor split along ``dim`` into ``targets`` (equal pieces, or ``sizes``)."""

    targets: tuple[str, ...]
    source: str
    dim: int
    sizes: tuple[int, ...] | None = None
    optional: bool = False

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.source

    def make_step(self, b):
        return Step(self, tuple(fill(t, b) for t in self.targets), (_ref(self.source, b),),
                    ops.Split(self.dim, len(self.targets), self.sizes))


@dataclass(frozen=True)
class Duplicate(Rule):
    """One source tensor becomes several identical targets (a buffer that the target model keeps twice).

    Each target after the first is a copy, so the outputs never share storage (safetensors refuses that).
    """

    targets: tuple[str, ...]
    source: str
    optional: bool = False

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.source

    def make_step(self, b):
        return Step(self, tuple(fill(t, b) for t in self.targets), (_ref(self.source, b),),
                    ops.Duplicate(len(self.targets)))


@dataclass(frozen=True)
class Concat(Rule):
    """Several source tensors concatenated along ``dim``; the first source is the primary pattern."""

    target: str
    sources: tuple[str, ...]
    dim: int
    optional: bool = False

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.sources[0]

    def make_step(self, b):
        return Step(self, (fill(self.target, b),), tuple(_ref(s, b) for s in self.sources), ops.Concat(self.dim))


@dataclass(frozen=True)
class Apply(Rule):
    """A typed op (:mod:`maskport.convert.ops`, e.g. ``Chain(LoraMerge(s), GroupedQkvSplit(h, kv))``) turning the
    ``sources`` (the first is the primary pattern) into the ``targets``."""

    targets: tuple[str, ...]
    sources: tuple[str, ...]
    op: ops.Op
    optional: bool = False

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.sources[0]

    def make_step(self, b):
        return Step(self, tuple(fill(t, b) for t in self.targets), tuple(_ref(s, b) for s in self.sources), self.op)


@dataclass(frozen=True)
class Drop(Rule):
    """Source tensors deliberately left out of the export; ``reason`` goes into the report."""

    source: str
    reason: str
    optional: bool = False

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.source

    def make_step(self, b):
        return Step(self, (), (), None, superseded=(_ref(self.source, b),), reason=self.reason)


@dataclass(frozen=True)
class DropRest(Drop):
    """Every not-yet-claimed tensor of ``source`` matching it, deliberately not written (runs after other rules,
    like :class:`CopyRest`); ``reason`` goes into the report."""

    claims_rest = True


@dataclass(frozen=True)
class DropIfEqual(Rule):
    """Every not-yet-claimed tensor of ``source`` matching it is a copy of ``equals`` (filled from the same
    placeholders), e.g. a persistent buffer that DeepSpeed's module state keeps beside the trained parameters
    (``ckpt:head.{rest}`` = ``head_ckpt:{rest}``). Planning reads both and checks them equal
    (the checkpoint's copy may be the other rounded to the training dtype: bfloat16 or float16); then the
    copy is dropped with ``reason`` and the export takes ``equals``' own tensor through its rule. A copy that
    differs (or whose shape differs) stops the conversion, naming it. ``equals`` is only read, not claimed."""

    source: str
    equals: str
    reason: str
    optional: bool = False
    claims_rest = True

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.source

    def make_step(self, b):
        other = _ref(self.equals, b)
        return Step(self, (), (), None, superseded=(_ref(self.source, b),),
                    reason=f"{self.reason} (values checked equal to the '{other.source}' copy)", equals=other)


@dataclass(frozen=True)
class CopyRest(Rule):
    """Every not-yet-claimed tensor of ``source`` matching it becomes ``target`` (runs after other rules)."""

    target: str
    source: str
    optional: bool = False
    claims_rest = True

    @property
    def primary(self) -> str:  # type: ignore[override]
        return self.source

    def make_step(self, b):
        return Step(self, (fill(self.target, b),), (_ref(self.source, b),), ops.Identity("copy"))


def prefixed(prefix: str, rules: Sequence[Rule], *, source: str | None = None) -> list[Rule]:
    """The same rules with ``prefix`` put before every target (and optionally another source name).

    Used to embed a shared sub-table (e.g. a shared mask head's table) under a model's submodule name.
    """
    import dataclasses

    out: list[Rule] = []
    for r in rules:
        changes: dict[str, Any] = {}
        if hasattr(r, "target"):
            changes["target"] = prefix + r.target
        if hasattr(r, "targets"):
            changes["targets"] = tuple(prefix + t for t in r.targets)
        if source is not None:
            for f in ("source", "base", "a", "b"):  # (DropIfEqual's ``equals`` names another source: kept)
                if hasattr(r, f) and isinstance(getattr(r, f), str):
                    changes[f] = source + ":" + parse_ref(getattr(r, f))[1]
            if hasattr(r, "sources"):
                changes["sources"] = tuple(source + ":" + parse_ref(s)[1] for s in r.sources)
            if hasattr(r, "replaces"):
                changes["replaces"] = tuple(source + ":" + parse_ref(s)[1] for s in r.replaces)
        out.append(dataclasses.replace(r, **changes))
    return out


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """peft's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. ``ValueError`` for a non-finite
    alpha or scaling, or a rank below 1 (an export full of NaN/inf weights must not be written)."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank r={r!r} must be a positive integer")
    try:
        s = alpha / math.sqrt(r) if use_rslora else alpha / r
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"LoRA alpha {alpha!r} is not a number") from exc
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and math.isfinite(s)):
        raise ValueError(f"LoRA alpha {alpha!r} gives a non-finite scaling {s!r}")
    if abs(s) > 3.4e38:  # the merge runs in float32
        raise ValueError(f"LoRA alpha {alpha!r} gives a scaling {s!r}, non-finite in float32 (the merge's dtype)")
    return s
