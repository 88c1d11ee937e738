"""Read the training config stored in an mmengine checkpoint (``meta['cfg']``) as data, never as code.

mmengine stores ``Config.pretty_text``: Python source of assignments such as
``path = '...'``, ``special_tokens = [...]``, ``model = dict(..., llm_lora=dict(r=128, lora_alpha=256))``.
We parse it with :mod:`ast` and evaluate only literals, ``dict(...)`` calls and names assigned earlier in
the same text; anything else (other calls, attributes, imports) becomes an :class:`Opaque` marker. Nothing
in the text is executed. The evaluator is bounded: text size, syntax nodes, nesting depth, the values it builds
(a name's value counted each time it is reused), integer and string sizes, and wall-clock time; a config beyond
them is refused (:class:`ConfigTooComplex`, one line) rather than evaluated until memory runs out.
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import UnreadableFile


@dataclass(frozen=True)
class Opaque:
    """A value we deliberately did not evaluate (its source text)."""

    source: str

    def __str__(self) -> str:
        return self.source


CONFIG_MAX_CHARS = 4 << 20
"""The longest training config text read (real mmengine configs are 5-50 KB)."""

MAX_NODES = 200_000
"""The most syntax nodes a config may have."""

MAX_DEPTH = 64
"""The deepest nesting of expressions evaluated (real configs nest < 10 levels)."""

MAX_VALUE_UNITS = 2_000_000
"""The most value nodes evaluation may build, counting a name's value again each time it is used (so that
``b = [a, a]; c = [b, b]; ...`` cannot build an exponential tree)."""

MAX_INT_BITS = 4096
"""The largest integer arithmetic may produce; a string result is limited to :data:`MAX_STR_CHARS`."""

MAX_STR_CHARS = 1 << 20

MAX_SECONDS = 5.0
"""Wall-clock bound on evaluating one config."""

_OPAQUE_SOURCE_NODES = 200  # an opaque expression larger than this is recorded by size, not by its source


class ConfigTooComplex(UnreadableFile):
    """A training config beyond the evaluator's bounds (size, nodes, depth, value size or time)."""


class _Budget:
    def __init__(self, sizes: dict[int, int]):
        self.units = 0
        self.sizes = sizes
        self.deadline = time.monotonic() + MAX_SECONDS
        self.name_units: dict[str, int] = {}

    def spend(self, n: int) -> None:
        self.units += n
        if self.units > MAX_VALUE_UNITS:
            raise ConfigTooComplex(f"the checkpoint's training config builds more than {MAX_VALUE_UNITS} values "
                                   f"(names reused to grow a value?); refused")
        if self.units & 0x3FF == 0 and time.monotonic() > self.deadline:
            raise ConfigTooComplex(f"the checkpoint's training config took more than {MAX_SECONDS} s to read; "
                                   f"refused")


def _opaque(node: ast.AST, budget: _Budget) -> Opaque:
    n = budget.sizes.get(id(node), 0)
    if n > _OPAQUE_SOURCE_NODES:
        return Opaque(f"<expression of {n} nodes>")
    return Opaque(ast.unparse(node))


def _check_value(v: Any) -> Any:
    if isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
        raise ConfigTooComplex(f"the checkpoint's training config computes an integer of more than {MAX_INT_BITS} "
                               f"bits; refused")
    if isinstance(v, str) and len(v) > MAX_STR_CHARS:
        raise ConfigTooComplex(f"the checkpoint's training config builds a string of more than {MAX_STR_CHARS} "
                               f"characters; refused")
    return v


def _arith(op: ast.operator, a: Any, b: Any) -> Any:
    """a op b for numbers, refusing results beyond the bounds before computing them."""
    if isinstance(a, int) and isinstance(b, int):
        bits = {ast.Add: max(a.bit_length(), b.bit_length()) + 1, ast.Sub: max(a.bit_length(), b.bit_length()) + 1,
                ast.Mult: a.bit_length() + b.bit_length(), ast.Div: 0}[type(op)]
        if bits > MAX_INT_BITS:
            raise ConfigTooComplex(f"the checkpoint's training config computes an integer of more than "
                                   f"{MAX_INT_BITS} bits; refused")
    try:
        return {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                ast.Div: lambda: a / b}[type(op)]()
    except (OverflowError, ZeroDivisionError):
        return None


def _eval(node: ast.AST, ns: dict[str, Any], budget: _Budget) -> Any:
    budget.spend(1)
    if isinstance(node, ast.Constant):
        return _check_value(node.value)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_eval(e, ns, budget) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:  # {**other}
                other = _eval(v, ns, budget)
                if isinstance(other, dict):
                    out.update(other)
                continue
            key = _eval(k, ns, budget)
            try:
                hash(key)
            except TypeError:
                key = str(key)
            out[key] = _eval(v, ns, budget)
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        out = {}
        for kw in node.keywords:
            val = _eval(kw.value, ns, budget)
            if kw.arg is None:
                if isinstance(val, dict):
                    out.update(val)
            else:
                out[kw.arg] = val
        return out
    if isinstance(node, ast.Name):
        if node.id in ns:
            budget.spend(budget.name_units.get(node.id, 1))  # a reused value counts again
            return ns[node.id]
        return Opaque(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _eval(node.operand, ns, budget)
        return -v if isinstance(v, (int, float)) else _opaque(node, budget)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval(node.left, ns, budget), _eval(node.right, ns, budget)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            v = _arith(node.op, a, b)
            return _opaque(node, budget) if v is None else _check_value(v)
        if isinstance(node.op, ast.Add) and isinstance(a, str) and isinstance(b, str):
            if len(a) + len(b) > MAX_STR_CHARS:
                _check_value(a + b[:MAX_STR_CHARS])
            return a + b
        return _opaque(node, budget)
    return _opaque(node, budget)


def _measure(tree: ast.AST) -> dict[int, int]:
    """Node count per expression node (iteratively, no recursion), refusing too many nodes or too deep nesting."""
    order: list[tuple[ast.AST, int]] = []
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigTooComplex(f"the checkpoint's training config nests deeper than {MAX_DEPTH} levels; refused")
        order.append((node, depth))
        if len(order) > MAX_NODES:
            raise ConfigTooComplex(f"the checkpoint's training config has more than {MAX_NODES} syntax nodes; refused")
        stack.extend((c, depth + 1) for c in ast.iter_child_nodes(node))
    sizes: dict[int, int] = {}
    for node, _ in reversed(order):
        sizes[id(node)] = 1 + sum(sizes.get(id(c), 0) for c in ast.iter_child_nodes(node))
    return sizes


def _parse(text: str) -> ast.Module:
    if len(text) > CONFIG_MAX_CHARS:
        raise ConfigTooComplex(f"the checkpoint's training config is {len(text)} characters (limit "
                               f"{CONFIG_MAX_CHARS}); refused")
    try:
        return ast.parse(text)
    except (RecursionError, MemoryError):
        raise ConfigTooComplex("the checkpoint's training config nests too deeply to parse; refused") from None


def parse_config_text(text: str) -> dict[str, Any]:
    """Top-level assignments of an mmengine config text, evaluated as data. Raises ``SyntaxError`` if the
    text is not Python, :class:`ConfigTooComplex` beyond the bounds above."""
    tree = _parse(text)
    budget = _Budget(_measure(tree))
    ns: dict[str, Any] = {}
    for stmt in tree.body:
        target = value = None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            target, value = stmt.targets[0].id, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            target, value = stmt.target.id, stmt.value
        if target is not None:
            before = budget.units
            ns[target] = _eval(value, ns, budget)
            budget.name_units[target] = max(1, budget.units - before)
    return ns


def _walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every value in ``obj``, depth first, without recursion; values nested deeper than
    :data:`MAX_DEPTH` (names can nest values deeper than the text does) are not entered."""
    stack: list[tuple[str, Any, int]] = [(path, obj, 0)]
    while stack:
        p, o, depth = stack.pop()
        yield p, o
        if depth >= MAX_DEPTH:
            continue
        if isinstance(o, dict):
            stack.extend((f"{p}.{k}" if p else str(k), v, depth + 1) for k, v in reversed(list(o.items())))
        elif isinstance(o, (list, tuple)):
            stack.extend((f"{p}[{i}]", v, depth + 1) for i, v in reversed(list(enumerate(o))))


@dataclass
class TrainingConfig:
    """What maskport needs from a training config. ``None`` = not found (flags may supply it)."""

    lora_r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    lora_target_modules: Any = None
    base_path: str | None = None
    special_tokens: list[str] | None = None
    template: Any = None
    pretrained_pth: str | None = None
    found_in: dict[str, str] = field(default_factory=dict)  # field -> where in the config it came from
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str | None) -> "TrainingConfig":
        if not text:
            return cls()
        try:
            ns = parse_config_text(text)
        except (SyntaxError, ValueError):  # not Python (or NUL bytes): nothing to read from it
            return cls()
        tc = cls(raw=ns)
        # LoRA: the first dict carrying both r and lora_alpha (Sa2VA: model.mllm.llm_lora)
        for path, obj in _walk(ns):
            if isinstance(obj, dict) and isinstance(obj.get("r"), int) and isinstance(obj.get("lora_alpha"), (int, float)):
                tc.lora_r, tc.lora_alpha = obj["r"], obj["lora_alpha"]
                tc.use_rslora = bool(obj.get("use_rslora", False)) is True
                tc.lora_target_modules = obj.get("target_modules")
                tc.found_in["lora"] = path
                break
        # base model path
        for name in ("path", "model_path", "pretrained_model_name_or_path", "mllm_name_or_path"):
            for path, obj in _walk(ns):
                if path.split(".")[-1] == name and isinstance(obj, str):
                    tc.base_path, tc.found_in["base_path"] = obj, path
                    break
            if tc.base_path:
                break
        for path, obj in _walk(ns):
            if path.split(".")[-1] == "special_tokens" and isinstance(obj, list) and all(isinstance(t, str) for t in obj):
                tc.special_tokens, tc.found_in["special_tokens"] = list(obj), path
                break
        for name in ("template", "prompt_template"):
            if name in ns and not isinstance(ns[name], Opaque):
                tc.template, tc.found_in["template"] = ns[name], name
                break
            if isinstance(ns.get(name), Opaque):  # e.g. PROMPT_TEMPLATE.qwen_chat
                tc.template, tc.found_in["template"] = str(ns[name]).split(".")[-1], name
                break
        for path, obj in _walk(ns):
            if path.split(".")[-1] == "pretrained_pth" and isinstance(obj, str):
                tc.pretrained_pth, tc.found_in["pretrained_pth"] = obj, path
                break
        return tc
