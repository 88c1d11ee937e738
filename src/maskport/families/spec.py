"""What a family is, as data: :class:`FamilySpec` (names, export code, inputs, quantization), the inputs it declares
(:class:`InputOption`), the options a conversion receives (:class:`ConvertOptions`) and what a family hands the
engine (:class:`Prepared`).

Every other place (the CLI, the convert API, quantize, the tests) reads a family's names from its spec; nothing
retypes them. One spelling per family: ``name`` (``sa2va-qwen2_5-vl``) is what users type; the package
(``sa2va_qwen2_5_vl``), the export's ``model_type`` (``maskport_sa2va_qwen2_5_vl``) and ``auto_map`` are derived
from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from ..convert.options import MMENGINE_TO_HF, ConvertOptions, InputOption  # noqa: F401  (re-exported)


@dataclass
class Prepared:
    """What a family hands the engine: sources, rules, the target model's shapes, the export config, and a
    callable that writes the non-weight files of the export folder."""

    sources: dict[str, Any]                       # name -> TensorSource
    rules: list                                   # the mapping table, expanded for these inputs
    expected: dict[str, tuple[int, ...]]
    export_config: dict
    write_files: Callable[[Path], list[str]]      # writes config/modeling/tokenizer files, returns names
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # resolved settings shown in the report (lora, tokens, ...)


@dataclass(frozen=True)
class FamilySpec:
    """Everything other code needs to know about a family, in one place.

    ``config_class`` / ``model_class``: the class names in ``code_files`` (configuration first, modeling second)
    that ``auto_map`` points at; ``heads``: the shared export modules (``maskport/heads/remote/``) its modeling
    code imports, copied beside it into each export; ``base_files``: files of the base folder carried into the
    export when present; ``inputs``: what the convert commands offer for it; ``released_command``: the name of the
    ``maskport convert`` command that imports its released HF folders (``None``: none);
    ``quant_target``: ``"module:attribute"`` of its :class:`~maskport.quantize.targets.QuantTarget` inside the
    family package, or ``None`` with ``no_quant_reason``."""

    name: str
    description: str
    mapping_version: str
    config_class: str
    model_class: str
    code_files: tuple[str, str]
    heads: tuple[str, ...]
    inputs: tuple[InputOption, ...]
    base_files: tuple[str, ...] = ()
    released_command: str | None = None
    quant_target: str | None = "quant:TARGET"
    no_quant_reason: str = ""
    docs: str = ""                                # docs page, relative to the repository root

    @property
    def package(self) -> str:
        """The family's Python package (folder) name under ``maskport/families/``."""
        return self.name.replace("-", "_").replace(".", "_")

    @property
    def model_type(self) -> str:
        """``model_type`` of the export's ``config.json``."""
        return "maskport_" + self.package

    @property
    def auto_map(self) -> dict[str, str]:
        cfg, mdl = (f.removesuffix(".py") for f in self.code_files)
        return {"AutoConfig": f"{cfg}.{self.config_class}", "AutoModel": f"{mdl}.{self.model_class}"}

    def inputs_for(self, command: str) -> tuple[InputOption, ...]:
        return tuple(o for o in self.inputs if command in o.commands)
