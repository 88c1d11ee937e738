"""Read the training config stored in an mmengine checkpoint (``meta['cfg']``) as data, never as code.

mmengine stores ``Config.pretty_text``: Python source of assignments such as
``path = '...'``, ``special_tokens = [...]``, ``model = dict(..., llm_lora=dict(r=128, lora_alpha=256))``.
We parse it with :mod:`ast` and evaluate only literals, ``dict(...)`` calls and names assigned earlier in
the same text; anything else (other calls, attributes, imports) becomes an :class:`Opaque` marker. Nothing
in the text is executed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass(frozen=True)
class Opaque:
    """A value we deliberately did not evaluate (its source text)."""

    source: str

    def __str__(self) -> str:
        return self.source


def _eval(node: ast.AST, ns: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_eval(e, ns) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:  # {**other}
                other = _eval(v, ns)
                if isinstance(other, dict):
                    out.update(other)
                continue
            key = _eval(k, ns)
            try:
                hash(key)
            except TypeError:
                key = str(key)
            out[key] = _eval(v, ns)
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        out = {}
        for kw in node.keywords:
            val = _eval(kw.value, ns)
            if kw.arg is None:
                if isinstance(val, dict):
                    out.update(val)
            else:
                out[kw.arg] = val
        return out
    if isinstance(node, ast.Name):
        return ns.get(node.id, Opaque(node.id))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _eval(node.operand, ns)
        return -v if isinstance(v, (int, float)) else Opaque(ast.unparse(node))
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval(node.left, ns), _eval(node.right, ns)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b,
                    ast.Div: a / b if b else Opaque(ast.unparse(node))}[type(node.op)]
        if isinstance(node.op, ast.Add) and isinstance(a, str) and isinstance(b, str):
            return a + b
        return Opaque(ast.unparse(node))
    return Opaque(ast.unparse(node))


def parse_config_text(text: str) -> dict[str, Any]:
    """Top-level assignments of an mmengine config text, evaluated as data. Raises ``SyntaxError`` if the
    text is not Python."""
    tree = ast.parse(text)
    ns: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            ns[stmt.targets[0].id] = _eval(stmt.value, ns)
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            ns[stmt.target.id] = _eval(stmt.value, ns)
    return ns


def _walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


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
        except SyntaxError:
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
