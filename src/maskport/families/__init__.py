"""Model families: one folder each (``maskport/families/<package>/``), found here by walking this package.

A family folder holds everything the family is: ``__init__.py`` (its :class:`~maskport.families.spec.FamilySpec`
and its :class:`Family` object, ``FAMILY``), its mapping table, detection and input handling, its exported remote
code (``remote/``), and its quantization target. Nothing outside the folder names it: adding a family adds no line
anywhere else (see ``docs/architecture.md``, "Add a family").

The engine never branches on a family's name; the CLI builds the convert commands' options from the families'
declared inputs.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingInput, WrongFamily
from .spec import MMENGINE_TO_HF, ConvertOptions, FamilySpec, InputOption, Prepared

if TYPE_CHECKING:  # pragma: no cover
    from ..convert.sources import TrainingCheckpoint
    from ..convert.training_config import TrainingConfig

FAMILIES_DIR = Path(__file__).resolve().parent


class Family:
    """A family's behaviour; subclasses set ``spec`` and implement :meth:`claims` and :meth:`prepare` (and, when
    ``spec.released_command`` is set, :meth:`claims_released` and :meth:`prepare_released`)."""

    spec: FamilySpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def mapping_version(self) -> str:
        return self.spec.mapping_version

    @property
    def folder(self) -> Path:
        return FAMILIES_DIR / self.spec.package

    def claims(self, ckpt: "TrainingCheckpoint") -> bool:
        """Whether the training checkpoint's keys look like this family's."""
        raise NotImplementedError

    def prepare(self, ckpt: "TrainingCheckpoint", cfg: "TrainingConfig", options: ConvertOptions) -> Prepared:
        """Open the other inputs, check they belong to this family, and build rules and the export config."""
        raise NotImplementedError

    def accepts(self, ckpt: "TrainingCheckpoint") -> bool:
        """Whether a checkpoint forced to this family (``--family``) can be its: by default :meth:`claims`; a family
        whose detection also reads the training config (e.g. which base generation) accepts on the keys alone."""
        return self.claims(ckpt)

    def claims_released(self, folder_config: dict) -> bool:
        return False

    def prepare_released(self, folder: Path, options: ConvertOptions) -> Prepared:
        raise NotImplementedError

    def training_layout(self, export_config: dict):
        """What this family's training checkpoint holds, for an export with this ``config.json``: a
        :class:`~maskport.convert.inverse.TrainingLayout` (``maskport convert hf-to-mmengine`` inverts it)."""
        raise MissingInput(f"family {self.name} cannot be converted back to a training checkpoint")

    def quant_target(self):
        """The family's :class:`~maskport.quantize.targets.QuantTarget` (imported on first use)."""
        if self.spec.quant_target is None:
            raise MissingInput(f"family {self.name} cannot be quantized: {self.spec.no_quant_reason}")
        module, attr = self.spec.quant_target.split(":")
        return getattr(importlib.import_module(f"{__name__}.{self.spec.package}.{module}"), attr)


FAMILIES: dict[str, Family] = {}


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules([str(FAMILIES_DIR)]), key=lambda i: i.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        fam = getattr(mod, "FAMILY", None)
        if not isinstance(fam, Family):
            raise TypeError(f"maskport/families/{info.name}/__init__.py must define FAMILY, a Family instance")
        if fam.spec.package != info.name:
            raise TypeError(f"family {fam.name!r} lives in folder {info.name!r}; its folder must be {fam.spec.package!r}")
        if fam.name in FAMILIES:
            raise TypeError(f"family {fam.name} defined twice")
        FAMILIES[fam.name] = fam


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise WrongFamily(f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def family_for_model_type(model_type: Any) -> Family | None:
    """The family whose exports have this ``model_type`` (``None``: not a maskport export)."""
    for fam in FAMILIES.values():
        if fam.spec.model_type == model_type:
            return fam
    return None


def detect_family(ckpt: "TrainingCheckpoint") -> Family:
    hits = [f for f in FAMILIES.values() if f.claims(ckpt)]
    if len(hits) == 1:
        return hits[0]
    sample = ", ".join(sorted(ckpt.source.keys())[:3])
    if not hits:
        raise WrongFamily(
            f"{ckpt.source.path}: no known family recognises this checkpoint (keys like {sample}); "
            f"known families: {', '.join(sorted(FAMILIES))}. Pass --family to force one."
        )
    raise WrongFamily(f"{ckpt.source.path}: several families match ({', '.join(f.name for f in hits)}); pass --family")


def released_commands() -> dict[str, list[Family]]:
    """``maskport convert`` command name -> the families that import released folders through it."""
    out: dict[str, list[Family]] = {}
    for fam in FAMILIES.values():
        if fam.spec.released_command:
            out.setdefault(fam.spec.released_command, []).append(fam)
    return out


def detect_released_family(folder: Path, folder_config: dict, command: str | None = None) -> Family:
    """The family that imports a released HF folder (among those of ``command`` when given)."""
    pool = [f for f in FAMILIES.values() if f.spec.released_command and
            (command is None or f.spec.released_command == command)]
    hits = [f for f in pool if f.claims_released(folder_config)]
    if len(hits) != 1:
        known = [f.name for f in pool]
        mt = folder_config.get("model_type") if isinstance(folder_config, dict) else None
        raise WrongFamily(f"{folder}: no family imports a released folder of model_type "
                          f"{mt!r} (families that import released folders: "
                          f"{', '.join(known) or 'none'})" if not hits else
                          f"{folder}: several families claim it: {', '.join(f.name for f in hits)}")
    return hits[0]


def command_inputs(command: str) -> list[InputOption]:
    """The union of the families' inputs for a convert command, each name once (families sharing an input declare
    the same :class:`InputOption`, e.g. the SAM2 head's)."""
    seen: dict[str, InputOption] = {}
    for fam in FAMILIES.values():
        for opt in fam.spec.inputs_for(command):
            if opt.name in seen and dataclasses.replace(seen[opt.name], commands=()) != dataclasses.replace(opt, commands=()):
                raise TypeError(f"input {opt.name!r} is declared differently by two families ({fam.name})")
            seen.setdefault(opt.name, opt)
    return list(seen.values())


_discover()

__all__ = ["FAMILIES", "ConvertOptions", "Family", "FamilySpec", "InputOption", "MMENGINE_TO_HF", "Prepared",
           "command_inputs", "detect_family", "detect_released_family", "family_for_model_type", "get_family",
           "released_commands"]
